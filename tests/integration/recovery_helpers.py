"""Two sites' agents played by a test through the real task protocol (`repo.tasks.claim` /
`finish`, then `Scheduler.apply_task_result` in the same transaction, as the agent API
does). `Sites` answers every open task of the agents of kvm-a (primary) and kvm-b2
(secondary) with what a real agent returns (docs/recovery.md, "Wiring"), keeping a
small model of each host: domains (defined, running), replica disks and their points,
overlays by tag, networks. Every `start_vm` checks the invariant: a VM's production copy
never runs on both sites (the test VM is not production)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from standby.domain.retention import RetentionPolicy, points_to_remove
from standby.orchestration.scheduler import Scheduler
from standby.store import Store
from standby.store.models import AgentTask
from standby.store.repo import agents, tasks

PRIMARY, SECONDARY = "kvm-a", "kvm-b2"
PREFIX = "dr-"
XML = "<domain type='kvm'><name>{vm}</name><devices><disk device='disk'><target dev='vda'/></disk>" \
      "<interface type='network'><source network='prod'/></interface></devices></domain>"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Host:
    name: str
    running: set[str] = field(default_factory=set)
    defined: set[str] = field(default_factory=set)
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # disk id -> points, oldest first
    overlays: dict[str, dict[str, str]] = field(default_factory=dict)      # tag -> {target: path}
    networks: set[str] = field(default_factory=set)
    restored: dict[str, str | None] = field(default_factory=dict)          # image -> point


class InvariantBroken(AssertionError):
    pass


@dataclass
class Sites:
    store: Store
    scheduler: Scheduler
    vms: tuple[str, ...] = ("web01",)
    hosts: dict[str, Host] = field(default_factory=dict)
    seq: itertools.count = field(default_factory=lambda: itertools.count(1))
    fail: dict[tuple[str, str | None], str] = field(default_factory=dict)  # (kind, name) -> error, once
    fail_always: dict[tuple[str, str | None], str] = field(default_factory=dict)
    hold: set[str] = field(default_factory=set)          # task kinds left unanswered
    before: dict[str, Callable[[Host, AgentTask], None]] = field(default_factory=dict)  # kind -> run once first
    log: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hosts = {PRIMARY: Host(PRIMARY, running=set(self.vms), defined=set(self.vms)), SECONDARY: Host(SECONDARY)}
        with self.store.transaction() as s:
            a = agents.get_agent(s, f"agent-{SECONDARY}")
            a.facts = {**(a.facts or {}), "vm_prefix": PREFIX}

    # ------------------------------------------------------------ invariant

    def check(self) -> None:
        for vm in self.vms:
            if vm in self.hosts[PRIMARY].running and PREFIX + vm in self.hosts[SECONDARY].running:
                self.violations.append(f"{vm} runs on both sites")
                raise InvariantBroken(f"{vm} runs on both sites")

    # ------------------------------------------------------------ answers

    def _answer(self, host: Host, task: AgentTask) -> dict[str, Any]:
        p = dict(task.params)
        kind = task.kind
        key = (kind, p.get("name") or p.get("vm") or p.get("tag"))
        for table, once in ((self.fail, True), (self.fail_always, False)):
            for k in (key, (kind, None)):
                if k in table:
                    msg = table.pop(k) if once else table[k]
                    raise _Fail(msg)
        if kind == "cycle":
            return self._cycle(host, p)
        if kind == "list_points":
            return {"points": {d: [dict(pt) for pt in host.points.get(d, [])] for d in p["disk_ids"]}}
        if kind == "materialize":
            for d, pid in p["point"].items():
                if pid not in {pt["id"] for pt in host.points.get(d, [])}:
                    raise _Fail(f"no point {pid} of disk {d}", "NotFound")  # as the agent's replica store
            ov = host.overlays.setdefault(p["tag"], {t: f"/replicas/overlays/{p['tag']}/{t}.qcow2"
                                                     for t in p["disk_ids"]})
            return {"overlays": dict(ov)}
        if kind == "release":
            return {"released": sorted(host.overlays.pop(p["tag"], {}).values())}
        if kind == "define_vm":
            host.defined.add(p["name"])
            return {"name": p["name"], "uuid": f"uuid-{p['name']}"}
        if kind == "undefine_vm":
            host.running.discard(p["name"])
            host.defined.discard(p["name"])
            return {"power_state": "undefined"}
        if kind == "start_vm":
            if p["name"] not in host.defined:
                raise _Fail(f"domain {p['name']} is not defined")
            host.running.add(p["name"])
            self.check()
            return {"power_state": "running"}
        if kind == "stop_vm":
            host.running.discard(p["name"])
            return {"power_state": "shut off"}
        if kind == "create_network":
            host.networks.add(p["name"])
            return {}
        if kind == "delete_network":
            host.networks.discard(p["name"])
            return {}
        if kind == "adopt_disk":
            pid = self._point(host, p["disk_id"], cycle=f"adopt-{next(self.seq)}", kind="adopted")
            return {"point_id": pid, "bytes": 0}
        if kind == "restore_disk":
            host.restored[p["image"]] = p.get("point")
            return {"bytes": 8192}
        if kind == "prune":  # the real retention rules, as the agent applies them
            policy = RetentionPolicy(float(p.get("retention_hours") or 0), None, float(p.get("keep_all_minutes") or 0))
            keep_ids = set((p.get("keep") or {}).values())
            removed = {}
            for d in p["disk_ids"]:
                pts = host.points.get(d, [])
                infos = [(pt["id"], datetime.fromisoformat(pt["created_at"]).timestamp(), pt["consistency"])
                         for pt in pts]
                pinned = {pt["id"] for pt in pts if pt["pinned"]} | keep_ids
                gone = set(points_to_remove(infos, policy, time.time(), pinned))
                removed[d] = [pt["id"] for pt in pts if pt["id"] in gone]
                host.points[d] = [pt for pt in pts if pt["id"] not in gone]
            return {"removed": removed, "missing": []}
        raise _Fail(f"unknown task kind {kind}")

    def _point(self, host: Host, disk_id: str, *, cycle: str, kind: str = "delta") -> str:
        pid = f"{next(self.seq):06d}"
        host.points.setdefault(disk_id, []).append(
            {"id": pid, "created_at": utcnow().isoformat(), "consistency": "crash", "kind": kind,
             "bytes_changed": 4096, "digest": "d" * 8, "pinned": False, "cycle": cycle})
        return pid

    def _cycle(self, host: Host, p: dict[str, Any]) -> dict[str, Any]:
        vm = p["vm"]
        if vm not in host.defined:
            raise _Fail(f"domain {vm} not found")
        peer = self.hosts[SECONDARY if host.name == PRIMARY else PRIMARY]
        disk_ids = p.get("disk_ids") or {"vda": f"{vm}-vda"}
        cycle = f"cp-{next(self.seq)}"
        points = {d: self._point(peer, d, cycle=cycle) for d in disk_ids.values()}
        moved = 4096 if p.get("force_hash_scan") else 65536
        out: dict[str, Any] = {"points": points, "point_at": utcnow().isoformat(), "bytes_sent": moved}
        out["domain_xml"] = XML.format(vm=vm)
        return out

    # ------------------------------------------------------------ the protocol

    def step(self) -> int:
        """Answer every open task once (and tick the scheduler); how many were answered."""
        self.scheduler.tick()
        n = 0
        for hname, host in self.hosts.items():
            with self.store.transaction() as s:
                agent = agents.get_agent(s, f"agent-{hname}")
                for task in tasks.claim(s, agent.id, max=50):
                    if task.kind in self.hold:
                        continue
                    etype = None
                    if task.kind in self.before:
                        self.before.pop(task.kind)(host, task)
                    try:
                        body, ok, err = self._answer(host, task), True, None
                    except _Fail as e:
                        body, ok, err, etype = {}, False, str(e), e.error_type
                    self.log.append((hname, task.kind, dict(task.params)))
                    done, _ = tasks.finish(s, agent.id, task.id, ok=ok, result=body, error=err,
                                           error_type=etype)
                    self.scheduler.apply_task_result(s, done, utcnow())
                    n += 1
        return n

    def until(self, cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.step()
            v = cond()
            if v:
                return v
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def kinds(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        return [(h, p) for h, k, p in self.log if k == kind]


class _Fail(Exception):
    def __init__(self, message: str, error_type: str = "RemoteError") -> None:
        super().__init__(message)
        self.error_type = error_type
