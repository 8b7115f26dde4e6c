"""The `hyperv-vmm` profile: one rule per row of the reference scenario's prerequisites
table (Hyper-V hosts in VMM clouds replicated to a secondary VMM site), plus the
scenario's support limits. `source` names the table row ("PRQ n") or the limit."""

from __future__ import annotations

from collections.abc import Iterator

from standby.domain.fabric import VMM_VERSIONS, WINDOWS_VERSIONS, DiskKind, Fabric, Platform
from standby.readiness import common
from standby.readiness.common import cloud_subject, host_subject, server_subject, vm_subject
from standby.readiness.engine import Problem, Severity, rule

HV = Platform.HYPERV
PROFILE = "hyperv-vmm"
MIN_VMM = "2012 SP1"
MIN_WINDOWS = "2012"
KB_2012R2_CLUSTER = "KB2961977"
MAX_DISKS = 16

rule("hv.control-plane", profile=PROFILE, severity=Severity.ERROR,
     requirement="A control plane is configured (the reference's subscription and vault).",
     source="PRQ 1")(common.control_plane_configured())
rule("hv.two-servers", profile=PROFILE, severity=Severity.WARNING,
     requirement="Two management (VMM) servers are recommended, one in the primary site and one in the secondary.",
     source="PRQ 2")(common.two_servers_recommended(HV))
rule("hv.single-server-two-clouds", profile=PROFILE, severity=Severity.ERROR,
     requirement="A single management server is supported only with at least two clouds, primary and secondary.",
     source="PRQ 3")(common.single_server_needs_two_clouds(HV))


@rule("hv.vmm-version", profile=PROFILE, severity=Severity.ERROR,
      requirement=f"Management servers run at least System Center {MIN_VMM}.", source="PRQ 4")
def vmm_version(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.servers_on(HV):
        version = fabric.servers[name].version
        if VMM_VERSIONS.index(version) < VMM_VERSIONS.index(MIN_VMM):
            yield Problem(server_subject(name), f"System Center {version} is older than {MIN_VMM}",
                          f"upgrade VMM to System Center {MIN_VMM} or later (2012 R2 or 2016 recommended)")


@rule("hv.vmm-updates", profile=PROFILE, severity=Severity.WARNING,
      requirement="Management servers have the latest updates installed.", source="PRQ 4")
def vmm_updates(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.servers_on(HV):
        if not fabric.servers[name].updates_current:
            yield Problem(server_subject(name), "the management server is missing the latest updates",
                          "install the latest update rollup for VMM, then rerun discovery")


rule("hv.vmm-reaches-control-plane", profile=PROFILE, severity=Severity.ERROR,
     requirement="Management servers can reach the control plane (the reference's internet access).",
     source="PRQ 5")(common.servers_reach_control_plane(HV))
rule("hv.server-has-cloud", profile=PROFILE, severity=Severity.ERROR,
     requirement="Each management server has one or more clouds.", source="PRQ 6")(common.server_has_cloud(HV))
rule("hv.cloud-capability", profile=PROFILE, severity=Severity.ERROR,
     requirement="Every cloud has the Hyper-V capability profile set.",
     source="PRQ 6")(common.cloud_has_capability(HV))
rule("hv.cloud-host-groups", profile=PROFILE, severity=Severity.ERROR,
     requirement="Every cloud contains one or more host groups.", source="PRQ 7")(common.cloud_has_host_groups(HV))


@rule("hv.host-os", profile=PROFILE, severity=Severity.ERROR,
      requirement=f"Hyper-V hosts run at least Windows Server {MIN_WINDOWS}.", source="PRQ 8")
def host_os(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.hosts_on(HV):
        os = fabric.hosts[name].os
        if os is None:
            yield Problem(host_subject(name), "the host's Windows Server version is not reported",
                          f"set hosts.{name}.os (or rerun discovery)")
        elif WINDOWS_VERSIONS.index(os) < WINDOWS_VERSIONS.index(MIN_WINDOWS):
            yield Problem(host_subject(name), f"Windows Server {os} is older than {MIN_WINDOWS}",
                          f"upgrade the host to Windows Server {MIN_WINDOWS} R2 or 2016")


@rule("hv.host-hyperv-role", profile=PROFILE, severity=Severity.ERROR,
      requirement="Hyper-V hosts have the Hyper-V role installed.", source="PRQ 8")
def host_role(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.hosts_on(HV):
        if "hyperv" not in fabric.hosts[name].roles:
            yield Problem(host_subject(name), "the Hyper-V role is not installed",
                          "install the role (Install-WindowsFeature Hyper-V -IncludeManagementTools) and restart")


@rule("hv.host-updates", profile=PROFILE, severity=Severity.WARNING,
      requirement="Hyper-V hosts have the latest updates installed.", source="PRQ 8")
def host_updates(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.hosts_on(HV):
        if not fabric.hosts[name].updates_current:
            yield Problem(host_subject(name), "the host is missing the latest updates",
                          "install the latest Windows updates on the host, then rerun discovery")


@rule("hv.host-has-vms", profile=PROFILE, severity=Severity.WARNING,
      requirement="Each Hyper-V host contains one or more VMs.", source="PRQ 9")
def host_has_vms(fabric: Fabric) -> Iterator[Problem]:
    secondary = {p.secondary for p in fabric.pairings}
    for name in fabric.hosts_on(HV):
        # Hosts only in secondary clouds receive replicas; they need no VMs of their own.
        if fabric.clouds_of_host(name) and set(fabric.clouds_of_host(name)) <= secondary:
            continue
        if not fabric.hosts[name].vms:
            yield Problem(host_subject(name), "the host runs no VM, so there is nothing to protect on it",
                          "create or move the VMs to protect onto this host, or remove it from the primary cloud")


rule("hv.hosts-in-paired-clouds", profile=PROFILE, severity=Severity.ERROR,
     requirement="Hyper-V hosts sit in host groups of the primary and the secondary clouds.",
     source="PRQ 10")(common.paired_clouds_have_hosts(HV))


def _cluster_os(fabric: Fabric, cluster: str) -> str | None:
    """The cluster's declared OS, else its members' OS when they agree."""
    declared = fabric.clusters[cluster].os
    if declared is not None:
        return declared
    found = {h.os for h in fabric.hosts.values() if h.cluster == cluster and h.os is not None}
    return found.pop() if len(found) == 1 else None


def _hyperv_clusters(fabric: Fabric) -> list[str]:
    hosts = fabric.hosts_on(HV)
    return sorted({fabric.hosts[h].cluster for h in hosts if fabric.hosts[h].cluster is not None})


@rule("hv.cluster-kb2961977", profile=PROFILE, severity=Severity.ERROR,
      requirement=f"Hyper-V cluster nodes running Windows Server 2012 R2 have update {KB_2012R2_CLUSTER} installed.",
      source="PRQ 11")
def cluster_kb(fabric: Fabric) -> Iterator[Problem]:
    for cluster in _hyperv_clusters(fabric):
        cluster_os = _cluster_os(fabric, cluster)
        # A node's own OS decides (a mixed 2012 R2 / 2016 cluster mid rolling upgrade still has
        # 2012 R2 nodes that need the update); a node that reports none takes the cluster's.
        missing = sorted(n for n, h in fabric.hosts.items()
                         if h.cluster == cluster and (h.os or cluster_os) == "2012 R2"
                         and KB_2012R2_CLUSTER not in h.installed_updates)
        if missing:
            yield Problem(f"cluster/{cluster}", f"nodes without {KB_2012R2_CLUSTER}: {', '.join(missing)}",
                          f"install {KB_2012R2_CLUSTER} on each node: https://support.microsoft.com/kb/2961977")


@rule("hv.cluster-static-broker", profile=PROFILE, severity=Severity.ERROR,
      requirement="Windows Server 2012 clusters with a static IP address have the replica broker configured by hand "
                  "(it is not created automatically).", source="PRQ 12")
def cluster_broker(fabric: Fabric) -> Iterator[Problem]:
    for cluster in _hyperv_clusters(fabric):
        c = fabric.clusters[cluster]
        if _cluster_os(fabric, cluster) == "2012" and c.address == "static" and not c.replica_broker:
            yield Problem(f"cluster/{cluster}",
                          "the replica broker is not configured; on a static-IP 2012 cluster it is not created for you",
                          "in Failover Cluster Manager add the Hyper-V Replica Broker role with a name and a static "
                          "IP address, then set clusters.NAME.replica_broker: true")


rule("hv.host-reaches-control-plane", profile=PROFILE, severity=Severity.ERROR,
     requirement="Hyper-V hosts can reach the control plane (the reference's internet access).",
     source="PRQ 13")(common.hosts_reach_control_plane(HV))


@rule("hv.limit-disks-per-vm", profile=PROFILE, severity=Severity.ERROR,
      requirement=f"A protected VM has at most {MAX_DISKS} disks.", source="limit: support matrix")
def disks_per_vm(fabric: Fabric) -> Iterator[Problem]:
    for host, vm in fabric.vms_on(HV):
        n = len(fabric.hosts[host].vms[vm].disks)
        if n > MAX_DISKS:
            yield Problem(vm_subject(host, vm), f"the VM has {n} disks; at most {MAX_DISKS} can be replicated",
                          "consolidate the VM's disks or exclude the ones that need no protection")


_UNSUPPORTED_KIND = {
    DiskKind.SHARED: "a shared cluster disk",
    DiskKind.PASSTHROUGH: "a pass-through disk",
    DiskKind.FIBRE_CHANNEL: "a virtual Fibre Channel disk",
}


@rule("hv.limit-disk-types", profile=PROFILE, severity=Severity.ERROR,
      requirement="No shared cluster disks, pass-through disks, virtual Fibre Channel or encrypted disks.",
      source="limit: support matrix")
def disk_types(fabric: Fabric) -> Iterator[Problem]:
    for host, vm in fabric.vms_on(HV):
        for disk_name, disk in fabric.hosts[host].vms[vm].disks.items():
            if disk.kind in _UNSUPPORTED_KIND:
                yield Problem(vm_subject(host, vm), f"disk {disk_name!r} is {_UNSUPPORTED_KIND[disk.kind]}, "
                              "which cannot be replicated", "move the data to a virtual disk (VHDX)")
            if disk.encrypted:
                yield Problem(vm_subject(host, vm), f"disk {disk_name!r} is encrypted at the host, "
                              "which cannot be replicated", "decrypt the disk or encrypt inside the guest instead")


@rule("hv.limit-ipv4", profile=PROFILE, severity=Severity.ERROR,
      requirement="Replication uses IPv4 only (host replication addresses and guest NICs).",
      source="limit: support matrix")
def ipv4_only(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.hosts_on(HV):
        address = fabric.hosts[name].replication_address
        if address is not None and ":" in address:
            yield Problem(host_subject(name), f"replication address {address} is IPv6",
                          "give the host an IPv4 address for replication traffic")
    for host, vm in fabric.vms_on(HV):
        for i, nic in enumerate(fabric.hosts[host].vms[vm].nics):
            if "ipv6" in nic.address_families:
                yield Problem(vm_subject(host, vm), f"NIC {i} uses IPv6, which is not carried over on failover",
                              "use IPv4 on the guest NIC")


@rule("hv.limit-one-os-per-cloud", profile=PROFILE, severity=Severity.ERROR,
      requirement="A cloud's hosts all run the same Windows Server version (no mixed 2016 / 2012 R2 cloud).",
      source="limit: support matrix")
def one_os_per_cloud(fabric: Fabric) -> Iterator[Problem]:
    for cloud in fabric.clouds_on(HV):
        versions = sorted({fabric.hosts[h].os for h in fabric.hosts_of_cloud(cloud) if fabric.hosts[h].os})
        if len(versions) > 1:
            yield Problem(cloud_subject(cloud), f"hosts run mixed Windows Server versions: {', '.join(versions)}",
                          "split the hosts into one cloud per Windows Server version")


rule("hv.limit-one-pairing-per-cloud", profile=PROFILE, severity=Severity.ERROR,
     requirement="A cloud is in at most one pairing.",
     source="limit: cloud pairing")(common.one_pairing_per_cloud(HV))
