"""The hypervisor driver interface the orchestration layer uses.

A driver talks to one host's hypervisor. Orchestration never imports libvirt (or, later,
PowerShell remoting); it holds a `HypervisorDriver` and the plain data classes below.
Errors cross this boundary as `standby.errors` types only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from standby.domain.fabric import Host
from standby.replication.changes import ChangeSource


class VmState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUT_OFF = "shut-off"
    CRASHED = "crashed"
    OTHER = "other"


@dataclass(frozen=True)
class DiskInfo:
    target: str  # the guest's device name, e.g. vda: stable across restarts
    path: str  # the image file on the host
    format: str  # qcow2, raw, ...
    size: int  # virtual size in bytes


@dataclass(frozen=True)
class NicInfo:
    mac: str
    network: str | None  # libvirt network or bridge name; None when unattached


@dataclass(frozen=True)
class VmInfo:
    name: str
    uuid: str
    state: VmState
    disks: list[DiskInfo]
    nics: list[NicInfo]
    has_guest_agent: bool = False


@dataclass(frozen=True)
class DiskChanges:
    """One disk's changes for a cycle: a change source the data plane sends from."""

    target: str
    source: ChangeSource
    # Why this disk needs a hash scan instead of the hypervisor's changed extents
    # (None when the dirty bitmap chain is intact): "first cycle", "checkpoint missing", ...
    resync_reason: str | None = None


@dataclass
class CycleSession:
    """A point-in-time view of a VM's disks for one replication cycle.

    Created by `HypervisorDriver.begin_cycle` as a context manager: while open, each
    disk's changes can be read; leaving it ends the hypervisor's backup job. Call
    `complete()` only after the secondary has committed the recovery point, so that
    the checkpoint the next cycle starts from matches what the replica holds."""

    vm: str
    checkpoint: str  # the checkpoint this cycle creates (the next cycle's base)
    consistency: str  # "app" when the guest's filesystems were frozen, else "crash"
    disks: list[DiskChanges] = field(default_factory=list)
    completed: bool = False
    # What the driver did or decided that an operator should see with the point
    # ("checkpoint standby-4 redefined from saved metadata", "guest agent not connected").
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VmSpec:
    """A VM to define on a secondary host from materialized recovery points."""

    name: str
    disks: dict[str, Path]  # target -> overlay path
    memory_mib: int = 512
    vcpus: int = 1
    networks: list[str | None] = field(default_factory=list)  # one per NIC; None: no network
    template_xml: str | None = None  # the source domain's XML, when known, to keep its shape


class HypervisorDriver(Protocol):
    uri: str

    def host_facts(self, only: Callable[[str], bool] | None = None) -> Host:
        """This host as a fabric Host (versions, CPU, free storage, VMs); `only`: the VMs
        (by name) worth inspecting, the others are skipped unread."""
        ...

    def list_vms(self, only: Callable[[str], bool] | None = None) -> list[VmInfo]: ...

    def vm(self, name: str) -> VmInfo: ...

    def domain_xml(self, name: str) -> str:
        """The VM's persistent definition, as the hypervisor keeps it (what a replica VM is
        defined from on the other site)."""
        ...

    def begin_cycle(self, vm: str, last_checkpoint: str | None, consistency: str = "auto") -> AbstractContextManager[CycleSession]:
        """Start a cycle: a checkpoint plus a point-in-time backup of every disk, with
        the changed extents since `last_checkpoint` (or a hash-scan source per disk when
        that chain is broken or absent)."""
        ...

    def complete_cycle(self, session: CycleSession) -> None:
        """The replica committed the point: keep this cycle's checkpoint, drop older ones."""
        ...

    def define_vm(self, spec: VmSpec) -> VmInfo: ...

    def start_vm(self, name: str) -> None: ...

    def set_autostart(self, name: str, on: bool) -> bool:
        """Whether the host starts the VM when it boots (the previous setting is returned):
        a failed-over source is kept from starting again when its host comes back."""
        ...

    def shutdown_vm(self, name: str, timeout: float = 60.0) -> None:
        """Graceful shutdown, forced off after `timeout` seconds."""
        ...

    def destroy_vm(self, name: str) -> None: ...

    def undefine_vm(self, name: str) -> None: ...

    def events(self) -> Iterator[str]: ...
