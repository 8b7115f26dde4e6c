"""Rules every deployment needs, and check builders that the platform profiles share
(the same requirement, scoped to one platform's servers, clouds and hosts)."""

from __future__ import annotations

from collections.abc import Iterator

from standby.domain.fabric import Fabric, Platform
from standby.readiness.engine import Check, Problem, Severity, rule


def server_subject(name: str) -> str:
    return f"server/{name}"


def cloud_subject(name: str) -> str:
    return f"cloud/{name}"


def host_subject(name: str) -> str:
    return f"host/{name}"


def vm_subject(host: str, vm: str) -> str:
    return f"vm/{host}/{vm}"


@rule("fabric.has-servers", profile="fabric", severity=Severity.ERROR,
      requirement="The fabric defines at least one management server.",
      source="design: readiness needs a server to choose a platform profile")
def has_servers(fabric: Fabric) -> Iterator[Problem]:
    if not fabric.servers:
        yield Problem("fabric", "no management server is defined, so no platform profile can be checked",
                      "add a server under `servers:` with its site and platform (hyperv or kvm)")


@rule("fabric.has-pairing", profile="fabric", severity=Severity.ERROR,
      requirement="At least one cloud pairing (primary cloud -> secondary cloud) exists.",
      source="scenario: protection runs from a primary cloud to its paired secondary cloud")
def has_pairing(fabric: Fabric) -> Iterator[Problem]:
    if fabric.servers and not fabric.pairings:
        yield Problem("fabric", "no cloud pairing is defined; nothing can be protected",
                      "add `pairings: [{primary: CLOUD, secondary: CLOUD}]`")


@rule("fabric.mixed-platform-pairing", profile="fabric", severity=Severity.ERROR,
      requirement="Both clouds of a pairing are managed on the same platform.",
      source="scenario: replication runs between hosts of one hypervisor kind")
def mixed_platform_pairing(fabric: Fabric) -> Iterator[Problem]:
    for p in fabric.pairings:
        a, b = fabric.platform_of_cloud(p.primary), fabric.platform_of_cloud(p.secondary)
        if a is not b:
            yield Problem(f"pairing/{p.primary}->{p.secondary}",
                          f"cloud {p.primary!r} is on {a} but cloud {p.secondary!r} is on {b}",
                          "pair clouds of servers with the same platform")


# Builders shared by the hyperv-vmm and kvm profiles.

def control_plane_configured() -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        if fabric.control_plane is None:
            yield Problem("fabric", "no control plane is configured",
                          "set `control_plane: {endpoint: https://HOST:PORT}` (the `standby server` address)")
    return check


def two_servers_recommended(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        servers = fabric.servers_on(platform)
        if len(servers) == 1:
            yield Problem(server_subject(servers[0]),
                          "only one management server: a site outage takes the management plane with it",
                          "add a second management server at the secondary site and pair clouds across sites")
        elif len(servers) > 1 and len({fabric.servers[s].site for s in servers}) == 1:
            yield Problem("fabric", "all management servers are in the same site",
                          "place one management server in each site")
    return check


def single_server_needs_two_clouds(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        servers = fabric.servers_on(platform)
        if len(servers) == 1 and len(fabric.clouds_of(servers[0])) < 2:
            yield Problem(server_subject(servers[0]),
                          f"the only management server has {len(fabric.clouds_of(servers[0]))} cloud(s); "
                          "a single server needs two, one primary and one secondary",
                          "create a second cloud on this server and pair the two")
    return check


def server_has_cloud(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        for name in fabric.servers_on(platform):
            if not fabric.clouds_of(name):
                yield Problem(server_subject(name), "the management server has no cloud",
                              "create a cloud on this server (under `clouds:` with `server: NAME`)")
    return check


def cloud_has_capability(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        for name in fabric.clouds_on(platform):
            if platform not in fabric.clouds[name].capabilities:
                yield Problem(cloud_subject(name), f"the cloud does not have the {platform} capability profile",
                              f"add `{platform}` to the cloud's capabilities")
    return check


def cloud_has_host_groups(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        for name in fabric.clouds_on(platform):
            if not fabric.clouds[name].host_groups:
                yield Problem(cloud_subject(name), "the cloud contains no host group",
                              "add one or more host groups to the cloud")
    return check


def paired_clouds_have_hosts(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        reported: set[str] = set()
        for p in fabric.pairings:
            for role, cloud in (("primary", p.primary), ("secondary", p.secondary)):
                if cloud in reported:
                    continue
                if fabric.platform_of_cloud(cloud) is platform and not fabric.hosts_of_cloud(cloud):
                    reported.add(cloud)
                    yield Problem(cloud_subject(cloud), f"the {role} cloud of a pairing has no host in its host groups",
                                  f"add {platform} hosts to a host group of cloud {cloud!r}")
        paired = fabric.paired_clouds()
        for host in fabric.hosts_on(platform):
            if not paired.intersection(fabric.clouds_of_host(host)):
                yield Problem(host_subject(host), "the host is in no paired cloud, so its VMs cannot be protected",
                              "add the host's group to a primary or secondary cloud", Severity.WARNING)
    return check


def servers_reach_control_plane(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        for name in fabric.servers_on(platform):
            if not fabric.servers[name].reaches_control_plane:
                yield Problem(server_subject(name), "the management server cannot reach the control plane",
                              "allow outbound HTTPS from the server to the control plane endpoint (proxy if needed)")
    return check


def hosts_reach_control_plane(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        for name in fabric.hosts_on(platform):
            if not fabric.hosts[name].reaches_control_plane:
                yield Problem(host_subject(name), "the host cannot reach the control plane",
                              "allow outbound HTTPS from the host to the control plane endpoint (proxy if needed)")
    return check


def one_pairing_per_cloud(platform: Platform) -> Check:
    def check(fabric: Fabric) -> Iterator[Problem]:
        uses: dict[str, list[str]] = {}
        for p in fabric.pairings:
            for cloud in (p.primary, p.secondary):
                uses.setdefault(cloud, []).append(f"{p.primary}->{p.secondary}")
        for cloud, pairs in uses.items():
            if len(pairs) > 1 and fabric.platform_of_cloud(cloud) is platform:
                yield Problem(cloud_subject(cloud), f"the cloud is in {len(pairs)} pairings ({', '.join(pairs)})",
                              "keep one pairing per cloud; split the hosts into separate clouds to pair them elsewhere")
    return check
