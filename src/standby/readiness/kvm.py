"""The `kvm` profile: the reference scenario's intent for libvirt/QEMU hosts, plus what
Standby's own data plane needs (incremental backup, reachability on the replication
port, space for retained points, compatible CPUs, mapped networks, synchronized clocks)."""

from __future__ import annotations

from collections.abc import Iterator

from standby.domain.fabric import DiskKind, Fabric, Platform, version_tuple
from standby.readiness import common
from standby.readiness.common import cloud_subject, host_subject, vm_subject
from standby.readiness.engine import Problem, Severity, rule

KVM = Platform.KVM
PROFILE = "kvm"
MIN_LIBVIRT = "7.6.0"  # checkpoints + pull-mode incremental backup
MIN_QEMU = "6.1.0"
MAX_CLOCK_SKEW_S = 5.0

rule("kvm.control-plane", profile=PROFILE, severity=Severity.ERROR,
     requirement="A control plane is configured.", source="PRQ 1 (control plane)")(common.control_plane_configured())
rule("kvm.two-servers", profile=PROFILE, severity=Severity.WARNING,
     requirement="Two management servers are recommended, one per site.",
     source="PRQ 2")(common.two_servers_recommended(KVM))
rule("kvm.single-server-two-clouds", profile=PROFILE, severity=Severity.ERROR,
     requirement="A single-server deployment has at least two clouds, primary and secondary.",
     source="PRQ 3")(common.single_server_needs_two_clouds(KVM))
rule("kvm.server-has-cloud", profile=PROFILE, severity=Severity.ERROR,
     requirement="Each management server has one or more clouds.", source="PRQ 6")(common.server_has_cloud(KVM))
rule("kvm.cloud-capability", profile=PROFILE, severity=Severity.ERROR,
     requirement="Every cloud has the kvm capability.", source="PRQ 6")(common.cloud_has_capability(KVM))
rule("kvm.cloud-host-groups", profile=PROFILE, severity=Severity.ERROR,
     requirement="Every cloud contains one or more host groups.", source="PRQ 7")(common.cloud_has_host_groups(KVM))
rule("kvm.hosts-in-paired-clouds", profile=PROFILE, severity=Severity.ERROR,
     requirement="Hosts sit in host groups of the primary and the secondary clouds.",
     source="PRQ 10")(common.paired_clouds_have_hosts(KVM))
rule("kvm.one-pairing-per-cloud", profile=PROFILE, severity=Severity.ERROR,
     requirement="A cloud is in at most one pairing.", source="limit: cloud pairing")(common.one_pairing_per_cloud(KVM))


@rule("kvm.control-plane-reachable", profile=PROFILE, severity=Severity.ERROR,
      requirement="Hosts and management servers can reach the control plane.", source="PRQ 5, PRQ 13")
def reach_control_plane(fabric: Fabric) -> Iterator[Problem]:
    yield from common.servers_reach_control_plane(KVM)(fabric)
    yield from common.hosts_reach_control_plane(KVM)(fabric)


@rule("kvm.host-versions", profile=PROFILE, severity=Severity.ERROR,
      requirement=f"Every host runs libvirt >= {MIN_LIBVIRT} and QEMU >= {MIN_QEMU} (incremental backup).",
      source="design: changed-block tracking through checkpoints and pull-mode backup")
def host_versions(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.hosts_on(KVM):
        host = fabric.hosts[name]
        for product, have, need in (("libvirt", host.libvirt_version, MIN_LIBVIRT), ("QEMU", host.qemu_version, MIN_QEMU)):
            if have is None:
                yield Problem(host_subject(name), f"the host's {product} version is not reported",
                              f"set hosts.{name}.{product.lower()}_version or rerun `standby discover`")
            elif version_tuple(have) < version_tuple(need):
                yield Problem(host_subject(name), f"{product} {have} is older than {need}, which incremental "
                              "backup needs", f"upgrade {product} to {need} or later (Debian 12 ships libvirt 9.0, QEMU 7.2)")


@rule("kvm.disk-format", profile=PROFILE, severity=Severity.WARNING,
      requirement="Disks are qcow2 v3 so QEMU can track changed blocks; raw and qcow2 v2 disks fall back to "
                  "hash-scan cycles; VHD/VHDX disks are not supported on KVM.",
      source="design: persistent dirty bitmaps need qcow2 v3")
def disk_format(fabric: Fabric) -> Iterator[Problem]:
    for host, vm in fabric.vms_on(KVM):
        for disk_name, disk in fabric.hosts[host].vms[vm].disks.items():
            subject = vm_subject(host, vm)
            if disk.format in ("vhd", "vhdx"):
                yield Problem(subject, f"disk {disk_name!r} is {disk.format}, which QEMU cannot track or boot from here",
                              "convert it: qemu-img convert -O qcow2 DISK DISK.qcow2", Severity.ERROR)
            elif disk.format == "raw":
                yield Problem(subject, f"disk {disk_name!r} is raw: no changed-block tracking, every cycle "
                              "scans the whole disk", "convert it to qcow2 v3 (qemu-img convert -O qcow2 -o compat=1.1)")
            elif disk.qcow2_compat == "0.10":
                yield Problem(subject, f"disk {disk_name!r} is qcow2 v2, which cannot hold dirty bitmaps; "
                              "every cycle scans the whole disk", "upgrade it offline: qemu-img amend -o compat=1.1 DISK")
            elif disk.qcow2_compat is None:
                yield Problem(subject, f"disk {disk_name!r} is qcow2 but its version (compat) is not reported, so "
                              "changed-block tracking is unknown",
                              f"set hosts.{host}.vms.{vm}.disks.{disk_name}.qcow2_compat or rerun `standby discover`")


@rule("kvm.disk-kinds", profile=PROFILE, severity=Severity.ERROR,
      requirement="No shared, pass-through, Fibre Channel or host-encrypted disks.", source="limit: support matrix")
def disk_kinds(fabric: Fabric) -> Iterator[Problem]:
    for host, vm in fabric.vms_on(KVM):
        for disk_name, disk in fabric.hosts[host].vms[vm].disks.items():
            if disk.kind is not DiskKind.VIRTUAL or disk.encrypted:
                what = "encrypted" if disk.encrypted else str(disk.kind)
                yield Problem(vm_subject(host, vm), f"disk {disk_name!r} is {what}; QEMU cannot track its changes",
                              "move the data to a qcow2 disk image")


@rule("kvm.replication-reachable", profile=PROFILE, severity=Severity.ERROR,
      requirement="Primary hosts reach the hosts of their paired secondary cloud on the replication port.",
      source="design: replication flows host to host")
def replication_reachable(fabric: Fabric) -> Iterator[Problem]:
    port = fabric.replication.port
    for host, pairing in fabric.primary_hosts():
        if fabric.platform_of_cloud(pairing.primary) is not KVM:
            continue
        targets = fabric.hosts_of_cloud(pairing.secondary)
        reached = set(fabric.hosts[host].reaches_hosts)
        missing = [t for t in targets if t not in reached]
        if targets and len(missing) == len(targets):
            yield Problem(host_subject(host), f"reaches no host of secondary cloud {pairing.secondary!r} on port {port}",
                          f"open TCP {port} from this host to the secondary hosts ({', '.join(targets)})")
        elif missing:
            yield Problem(host_subject(host), f"cannot reach {', '.join(missing)} on port {port}; replicas can "
                          "only be placed on the others", f"open TCP {port} to {', '.join(missing)}", Severity.WARNING)


@rule("kvm.secondary-storage", profile=PROFILE, severity=Severity.ERROR,
      requirement="The secondary cloud has free space for the protected disks plus the retention overhead.",
      source="design: replica store with retained recovery points")
def secondary_storage(fabric: Fabric) -> Iterator[Problem]:
    overhead = 1 + fabric.replication.retention_overhead_percent / 100
    for p in fabric.pairings:
        if fabric.platform_of_cloud(p.primary) is not KVM:
            continue
        need = overhead * sum(d.size_gib for h in fabric.hosts_of_cloud(p.primary)
                              for vm in fabric.hosts[h].vms.values() for d in vm.disks.values())
        secondary_hosts = fabric.hosts_of_cloud(p.secondary)
        unknown = [h for h in secondary_hosts if fabric.hosts[h].storage_free_gib is None]
        free = sum(fabric.hosts[h].storage_free_gib or 0 for h in secondary_hosts)
        if unknown and free < need:
            yield Problem(cloud_subject(p.secondary), f"free space is not reported for {', '.join(unknown)}",
                          "set hosts.NAME.storage_free_gib or rerun `standby discover`", Severity.WARNING)
        elif free < need:
            yield Problem(cloud_subject(p.secondary), f"needs {need:.1f} GiB for the protected disks of "
                          f"{p.primary!r} and their retained points, has {free:.1f} GiB free",
                          "add storage to the secondary hosts, or shorten the retention window")


@rule("kvm.cpu-compatible", profile=PROFILE, severity=Severity.ERROR,
      requirement="Each primary host has a secondary host with a compatible CPU (same vendor, a superset of features).",
      source="design: a failed-over VM keeps its CPU model")
def cpu_compatible(fabric: Fabric) -> Iterator[Problem]:
    for host, pairing in fabric.primary_hosts():
        if fabric.platform_of_cloud(pairing.primary) is not KVM:
            continue
        cpu = fabric.hosts[host].cpu
        candidates = [fabric.hosts[h].cpu for h in fabric.hosts_of_cloud(pairing.secondary)]
        # One known-compatible secondary host meets the requirement, whatever the others report.
        if cpu is not None and any(c is not None and c.vendor == cpu.vendor and set(cpu.features) <= set(c.features)
                                   for c in candidates):
            continue
        if cpu is None or any(c is None for c in candidates):
            yield Problem(host_subject(host), "CPU models are not reported, so failover compatibility is unknown",
                          "set hosts.NAME.cpu or rerun `standby discover`", Severity.WARNING)
            continue
        if candidates:
            yield Problem(host_subject(host), f"no host of {pairing.secondary!r} offers a CPU compatible with "
                          f"{cpu.vendor} {cpu.model}", "add a compatible secondary host, or give the VMs a baseline "
                          "CPU model (for example x86-64-v2) that both sites support")


@rule("kvm.network-mapping", profile=PROFILE, severity=Severity.WARNING,
      requirement="Every VM network of a primary cloud has a network mapping (unmapped NICs start disconnected).",
      source="reference: network mapping")
def network_mapping(fabric: Fabric) -> Iterator[Problem]:
    mapped = {m.primary for m in fabric.network_mappings}
    for host, pairing in fabric.primary_hosts():
        if fabric.platform_of_cloud(pairing.primary) is not KVM:
            continue
        for vm_name, vm in fabric.hosts[host].vms.items():
            for i, nic in enumerate(vm.nics):
                if nic.network is not None and nic.network not in mapped:
                    yield Problem(vm_subject(host, vm_name), f"NIC {i} is on network {nic.network!r}, which has "
                                  "no mapping: after failover it starts disconnected",
                                  f"add a network mapping from {nic.network!r} to a secondary network")


@rule("kvm.clock-skew", profile=PROFILE, severity=Severity.ERROR,
      requirement=f"Host clocks are within {MAX_CLOCK_SKEW_S:.0f} s of the control plane.",
      source="design: recovery point times and certificate validity")
def clock_skew(fabric: Fabric) -> Iterator[Problem]:
    for name in fabric.hosts_on(KVM):
        skew = fabric.hosts[name].clock_skew_seconds
        if abs(skew) > MAX_CLOCK_SKEW_S:
            yield Problem(host_subject(name), f"the clock is {skew:+.1f} s off the control plane",
                          "synchronize the host's clock with NTP (chrony)")
