"""The fabric: a pure model of a two-site deployment.

A fabric says what exists (sites, management servers, clouds, host groups, hosts,
clusters, VMs, networks) and how it is paired and mapped. It holds facts, not
verdicts: whether those facts make a deployment ready is the readiness rules' job.

Collections are mappings keyed by name, so a name is unique by construction and
references (`cloud.server`, `host_group.hosts`, ...) are plain names checked by
`Fabric._check_references`. Every model forbids unknown keys so that a typo in a
fabric file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")]
Version = Annotated[str, StringConstraints(pattern=r"^\d{1,6}(\.\d{1,6}){0,3}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Platform(StrEnum):
    HYPERV = "hyperv"
    KVM = "kvm"


# Product generations in release order; rules compare by position.
VMM_VERSIONS = ("2012", "2012 SP1", "2012 R2", "2016", "2019", "2022", "2025")
WINDOWS_VERSIONS = ("2008 R2", "2012", "2012 R2", "2016", "2019", "2022", "2025")
VmmVersion = Literal["2012", "2012 SP1", "2012 R2", "2016", "2019", "2022", "2025"]
WindowsVersion = Literal["2008 R2", "2012", "2012 R2", "2016", "2019", "2022", "2025"]


def version_tuple(version: str) -> tuple[int, ...]:
    """'9.0.0' -> (9, 0, 0); pads to three parts so '7.6' == '7.6.0'."""
    parts = tuple(int(p) for p in version.split("."))
    return parts + (0,) * (3 - len(parts))


class ControlPlane(Strict):
    endpoint: Annotated[str, StringConstraints(pattern=r"^https://[^\s/]+(:\d+)?(/\S*)?$")]


class Site(Strict):
    description: str = ""


class Server(Strict):
    """A site's management server (VMM for Hyper-V, a Standby site manager for KVM)."""

    site: Name
    platform: Platform
    version: str = Field(description="product version: a System Center release for hyperv, Standby's for kvm")
    updates_current: bool = True
    reaches_control_plane: bool = True

    @model_validator(mode="after")
    def _version_for_platform(self) -> Server:
        if self.platform is Platform.HYPERV and self.version not in VMM_VERSIONS:
            raise ValueError(f"version {self.version!r} is not a System Center release; one of {', '.join(VMM_VERSIONS)}")
        if self.platform is Platform.KVM and not re.fullmatch(r"\d{1,6}(\.\d{1,6}){0,3}", self.version):
            raise ValueError(f"version {self.version!r} is not a dotted version such as 0.1.0")
        return self


class Cloud(Strict):
    server: Name
    capabilities: list[Platform] = Field(default_factory=list)
    host_groups: list[Name] = Field(default_factory=list)


class HostGroup(Strict):
    hosts: list[Name] = Field(default_factory=list)


class CpuInfo(Strict):
    vendor: str
    model: str
    features: list[str] = Field(default_factory=list)


class Host(Strict):
    """A hypervisor host. Hyper-V facts and KVM facts are optional: a rule that needs
    a fact the discovery did not report says so rather than guessing."""

    os: WindowsVersion | None = Field(default=None, description="Windows Server release (Hyper-V hosts)")
    roles: list[str] = Field(default_factory=list)
    updates_current: bool = True
    installed_updates: list[Annotated[str, StringConstraints(pattern=r"^KB\d+$")]] = Field(default_factory=list)
    libvirt_version: Version | None = None
    qemu_version: Version | None = None
    cpu: CpuInfo | None = None
    cluster: Name | None = None
    replication_address: str | None = Field(default=None, description="address the replication engine listens on")
    reaches_control_plane: bool = True
    reaches_hosts: list[Name] = Field(default_factory=list, description="hosts reachable on the replication port")
    clock_skew_seconds: float = Field(default=0.0, allow_inf_nan=False)
    storage_free_gib: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    vms: dict[Name, Vm] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _address_is_ip(self) -> Host:
        if self.replication_address is not None:
            try:
                ipaddress.ip_address(self.replication_address)
            except ValueError:
                raise ValueError(f"replication_address {self.replication_address!r} is not an IP address") from None
        return self


class DiskKind(StrEnum):
    VIRTUAL = "virtual"
    SHARED = "shared"  # shared cluster disk / shared VHDX
    PASSTHROUGH = "passthrough"
    FIBRE_CHANNEL = "fibre_channel"


class Disk(Strict):
    format: Literal["qcow2", "raw", "vhd", "vhdx"]
    size_gib: float = Field(gt=0, allow_inf_nan=False)
    kind: DiskKind = DiskKind.VIRTUAL
    encrypted: bool = False
    qcow2_compat: Literal["0.10", "1.1"] | None = Field(default=None, description="1.1 is qcow2 v3")


class Nic(Strict):
    network: Name | None = None
    address_families: list[Literal["ipv4", "ipv6"]] = Field(default_factory=lambda: ["ipv4"])


class Vm(Strict):
    disks: dict[Name, Disk] = Field(default_factory=dict)
    nics: list[Nic] = Field(default_factory=list)


class Cluster(Strict):
    os: WindowsVersion | None = None
    address: Literal["static", "dhcp"] = "dhcp"
    replica_broker: bool = False


class Network(Strict):
    site: Name


class Pairing(Strict):
    primary: Name
    secondary: Name


class NetworkMapping(Strict):
    primary: Name
    secondary: Name


class ReplicationSettings(Strict):
    port: StrictInt = Field(default=7443, ge=1, le=65535)
    # Extra space the secondary needs beyond the disks themselves, for retained points.
    retention_overhead_percent: float = Field(default=25.0, ge=0, le=1000, allow_inf_nan=False)


class ReferenceProblems(ValueError):
    """Names that refer to nothing; carries each problem's location for the loader."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))


class Fabric(Strict):
    control_plane: ControlPlane | None = None
    sites: dict[Name, Site] = Field(default_factory=dict)
    servers: dict[Name, Server] = Field(default_factory=dict)
    clouds: dict[Name, Cloud] = Field(default_factory=dict)
    host_groups: dict[Name, HostGroup] = Field(default_factory=dict)
    hosts: dict[Name, Host] = Field(default_factory=dict)
    clusters: dict[Name, Cluster] = Field(default_factory=dict)
    networks: dict[Name, Network] = Field(default_factory=dict)
    pairings: list[Pairing] = Field(default_factory=list)
    network_mappings: list[NetworkMapping] = Field(default_factory=list)
    replication: ReplicationSettings = Field(default_factory=ReplicationSettings)

    @model_validator(mode="after")
    def _check_references(self) -> Fabric:
        problems = self.reference_problems()
        if problems:
            raise ReferenceProblems(problems)
        return self

    def reference_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every name that refers to something undefined, as (location, message)."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        tables: dict[str, dict[str, object]] = {
            "sites": self.sites, "servers": self.servers, "clouds": self.clouds,
            "host_groups": self.host_groups, "hosts": self.hosts,
            "clusters": self.clusters, "networks": self.networks,
        }

        def need(section: str, name: str | None, *loc: str | int) -> None:
            if name is not None and name not in tables[section]:
                problems.append((loc, f"{name!r} is not defined under {section}"))

        for name, server in self.servers.items():
            need("sites", server.site, "servers", name, "site")
        for name, cloud in self.clouds.items():
            need("servers", cloud.server, "clouds", name, "server")
            for i, group in enumerate(cloud.host_groups):
                need("host_groups", group, "clouds", name, "host_groups", i)
        for name, group in self.host_groups.items():
            for i, host in enumerate(group.hosts):
                need("hosts", host, "host_groups", name, "hosts", i)
        for name, host in self.hosts.items():
            need("clusters", host.cluster, "hosts", name, "cluster")
            for i, peer in enumerate(host.reaches_hosts):
                need("hosts", peer, "hosts", name, "reaches_hosts", i)
            for vm_name, vm in host.vms.items():
                for i, nic in enumerate(vm.nics):
                    need("networks", nic.network, "hosts", name, "vms", vm_name, "nics", i, "network")
        for name, network in self.networks.items():
            need("sites", network.site, "networks", name, "site")
        for i, pairing in enumerate(self.pairings):
            need("clouds", pairing.primary, "pairings", i, "primary")
            need("clouds", pairing.secondary, "pairings", i, "secondary")
            if pairing.primary == pairing.secondary:
                problems.append((("pairings", i), f"cloud {pairing.primary!r} cannot be paired with itself"))
        for i, mapping in enumerate(self.network_mappings):
            need("networks", mapping.primary, "network_mappings", i, "primary")
            need("networks", mapping.secondary, "network_mappings", i, "secondary")
        return problems

    # Navigation helpers: pure lookups the rules share.

    def clouds_of(self, server: str) -> list[str]:
        return [name for name, cloud in self.clouds.items() if cloud.server == server]

    def hosts_of_cloud(self, cloud: str) -> list[str]:
        seen: dict[str, None] = {}
        for group in self.clouds[cloud].host_groups:
            for host in self.host_groups[group].hosts:
                seen.setdefault(host)
        return list(seen)

    def clouds_of_host(self, host: str) -> list[str]:
        return [name for name in self.clouds if host in self.hosts_of_cloud(name)]

    def platform_of_cloud(self, cloud: str) -> Platform:
        return self.servers[self.clouds[cloud].server].platform

    def hosts_on(self, platform: Platform) -> list[str]:
        """Hosts in any cloud of a server of this platform."""
        seen: dict[str, None] = {}
        for cloud in self.clouds:
            if self.platform_of_cloud(cloud) is platform:
                for host in self.hosts_of_cloud(cloud):
                    seen.setdefault(host)
        return list(seen)

    def vms_on(self, platform: Platform) -> list[tuple[str, str]]:
        """(host, vm) for every VM on a host of this platform."""
        return [(host, vm) for host in self.hosts_on(platform) for vm in self.hosts[host].vms]

    def servers_on(self, platform: Platform) -> list[str]:
        return [name for name, server in self.servers.items() if server.platform is platform]

    def clouds_on(self, platform: Platform) -> list[str]:
        return [name for name in self.clouds if self.platform_of_cloud(name) is platform]

    def paired_clouds(self) -> set[str]:
        return {c for p in self.pairings for c in (p.primary, p.secondary)}

    def pairing_of_primary(self, cloud: str) -> Pairing | None:
        return next((p for p in self.pairings if p.primary == cloud), None)

    def primary_hosts(self) -> list[tuple[str, Pairing]]:
        """(host, pairing) for every host in the primary cloud of a pairing."""
        return [(host, p) for p in self.pairings for host in self.hosts_of_cloud(p.primary)]

    def platforms(self) -> set[Platform]:
        return {server.platform for server in self.servers.values()}


Host.model_rebuild()
