"""Break-glass failover: start a VM's replica on this secondary host from its replica store
alone, on the day no control plane answers (`standby agent failover VM`).

    record = failover(cfg, "web01", point="latest")

It refuses while any control plane of the agent's configuration answers (fail over through
it, or promote the standby one). Otherwise it takes the VM point from the replica store
(`replication/catalog.py`): the point's manifest (`domain/vm_point.py`) gives the VM's
definition, its disks and the network mapping, so the steps are those of an orchestrated
unplanned failover, run here with the same agent tasks and the same parameters
(`agent/recovery.py`): materialize the point as overlays (tag `failover-<item>`, pinned),
define the replica VM (`<vm_prefix><vm>`) from the source's definition with the overlays
and the mapped networks, start it.

What it did is recorded in `A/breakglass/<vm>.json` before each step and after the last
(so a second run after a crash goes on where the first stopped: every step is idempotent).
When a control plane answers again, the agent reports the record
(`POST /agent/breakglass`); the control plane then holds the item as failed over, as if it
had run the failover itself, with a job whose log shows the break-glass steps
(`orchestration/breakglass.py`).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standby.agent.config import AgentConfig, replica_vm_name
from standby.errors import NotFound, Refused, StandbyError

if TYPE_CHECKING:
    from standby.agent.tasks import TaskEnv

log = logging.getLogger("standby.agent")

RECORDS_DIR = "breakglass"
FORMAT = "standby-breakglass/1"
PROBE_TIMEOUT = 5.0


@dataclass
class BreakGlassRecord:
    """One break-glass failover of a VM, as `A/breakglass/<vm>.json` keeps it."""

    vm: str
    item_id: int | None
    replica_vm: str
    point: dict[str, Any]  # {id, disks: {disk id: point id}, created_at, consistency}
    tag: str
    networks: list[str | None]
    agent: str
    host: str
    by: str  # the operator (user@machine) who ran it
    started_at: float
    steps: list[dict[str, Any]] = field(default_factory=list)  # {name, seconds, note}
    overlays: dict[str, str] = field(default_factory=dict)
    outcome: str = "running"  # running, done, failed
    error: str | None = None
    finished_at: float | None = None
    reported_at: float | None = None  # when a control plane took it

    @property
    def seconds(self) -> float | None:
        """The failover's own duration (its share of the RTO)."""
        return None if self.finished_at is None else self.finished_at - self.started_at

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BreakGlassRecord:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def records_dir(cfg: AgentConfig) -> Path:
    return cfg.data_dir / RECORDS_DIR


def _path(cfg: AgentConfig, vm: str) -> Path:
    from standby.contract import disk_id_for

    return records_dir(cfg) / f"{disk_id_for(vm, 'breakglass')}.json"


def save(cfg: AgentConfig, rec: BreakGlassRecord) -> None:
    path = _path(cfg, rec.vm)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(rec.as_dict(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(cfg: AgentConfig, vm: str) -> BreakGlassRecord | None:
    try:
        return BreakGlassRecord.from_dict(json.loads(_path(cfg, vm).read_text()))
    except FileNotFoundError:
        return None


def unreported(cfg: AgentConfig) -> list[BreakGlassRecord]:
    """Finished records no control plane has taken yet (the agent reports them)."""
    out = []
    d = records_dir(cfg)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            rec = BreakGlassRecord.from_dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("break-glass record %s unreadable: %s", p, exc)
            continue
        if rec.outcome != "running" and rec.reported_at is None:
            out.append(rec)
    return out


def answering_control_planes(cfg: AgentConfig, timeout: float = PROBE_TIMEOUT) -> list[tuple[str, str]]:
    """The control planes of the configuration that answer now: (url, role) each."""
    from standby.client import ApiClient

    out = []
    for url in cfg.urls:
        try:
            client = ApiClient(url, ca=cfg.ca_path, cert=(cfg.cert_path, cfg.key_path), timeout=timeout)
        except StandbyError:
            continue
        try:
            health = client.request("GET", "/health")
        except StandbyError:
            continue
        finally:
            client.close()
        role = health.get("role", "active") if isinstance(health, dict) else "active"
        out.append((url, str(role)))
    return out


def failover(cfg: AgentConfig, vm: str, *, point: str = "latest", network: str | None = None,
             env: TaskEnv | None = None, check_control_plane: bool = True,
             report: Callable[[str], None] | None = None) -> BreakGlassRecord:
    """Fail `vm` over to this host from the replica store alone (see the module doc)."""
    from standby.agent import recovery
    from standby.agent.tasks import TaskProgress
    from standby.replication import catalog

    say = report or (lambda line: None)
    if check_control_plane:
        answering = answering_control_planes(cfg)
        if answering:
            url, role = answering[0]
            if role == "passive":
                raise Refused(f"the standby control plane at {url} answers: promote it (standby server promote "
                              f"on its host) and fail {vm} over through it, not by breaking glass")
            raise Refused(f"the control plane at {url} answers: fail {vm} over through it (standby failover "
                          f"{vm} --type unplanned, or a recovery plan); break glass only when none answers")
        say(f"no control plane answers ({', '.join(cfg.urls)}): failing over from the replica store alone")
    env = env or task_env(cfg)
    replica = replica_vm_name(cfg.vm_prefix, vm)
    rec = load(cfg, vm)
    if rec is not None and rec.outcome == "done":
        vm_info = _find(env, replica)
        if vm_info is not None and vm_info.state.value == "running":
            say(f"{vm} was failed over already (point {rec.point.get('id')}); its replica {replica} runs")
            return rec
    chosen = catalog.choose(env.store, vm, point, now=time.time())
    manifest = chosen.manifest
    if manifest is None or not manifest.startable:
        raise Refused(f"recovery point {chosen.id} of VM {vm} carries no VM definition (a point from before "
                      "manifests, or one whose definition could not be read): it needs a control plane to "
                      "fail over; an older point may carry one (standby points show --vm)")
    nets = [network] * len(manifest.networks) if network else manifest.secondary_networks()
    tag = f"failover-{manifest.item_id}" if manifest.item_id is not None else f"breakglass-{vm}"
    point_info = {"id": chosen.id, "disks": dict(chosen.point.disks), "created_at": chosen.point.created_at,
                  "consistency": "app" if chosen.point.app_consistent else "crash"}
    if rec is None or rec.outcome != "running" or rec.point.get("id") != chosen.id:
        rec = BreakGlassRecord(vm=vm, item_id=manifest.item_id, replica_vm=replica, point=point_info, tag=tag,
                               networks=nets, agent=cfg.name, host=cfg.host, by=_operator(),
                               started_at=time.time())
    else:
        say(f"resuming the break-glass failover of {vm} started at {time.ctime(rec.started_at)}")
    age = time.time() - chosen.point.created_at
    say(f"recovery point {chosen.id} ({point_info['consistency']}-consistent, taken {age:.0f} s ago) "
        f"on {len(chosen.records)} disk(s)")
    save(cfg, rec)
    progress = TaskProgress()

    def step(name: str, run: Callable[[], dict[str, Any]], note: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            out = run()
        except StandbyError as exc:
            rec.outcome, rec.error, rec.finished_at = "failed", f"{name}: {exc.message}", time.time()
            rec.steps.append({"name": name, "seconds": round(time.monotonic() - t0, 3), "error": exc.message})
            save(cfg, rec)
            raise
        text = note(out)
        rec.steps.append({"name": name, "seconds": round(time.monotonic() - t0, 3), "note": text})
        save(cfg, rec)
        say(f"{name}: {text} ({time.monotonic() - t0:.1f} s)")
        return out

    res = step("materialize the point as an overlay",
               lambda: recovery.RECOVERY_TASKS["materialize"](
                   env, {"vm": vm, "disk_ids": manifest.disks, "point": point_info["disks"], "purpose": "failover",
                         "tag": tag}, progress),
               lambda r: f"{len(r.get('overlays') or {})} overlay(s) under tag {tag}")
    rec.overlays = dict(res.get("overlays") or {})
    step("define the replica VM",
         lambda: recovery.RECOVERY_TASKS["define_vm"](
             env, {"name": replica, "template_xml": manifest.domain_xml, "disks": rec.overlays, "networks": nets},
             progress),
         lambda r: f"{replica} ({'kept' if r.get('existed') else 'defined'}), networks "
                   f"{', '.join(n or '(none)' for n in nets) or '(no NIC)'}")
    step("start the replica VM",
         lambda: recovery.RECOVERY_TASKS["start_vm"](env, {"name": replica}, progress),
         lambda r: "it was running already" if r.get("was_running") else "started")
    rec.outcome, rec.finished_at = "done", time.time()
    save(cfg, rec)
    return rec


def _find(env: TaskEnv, name: str) -> Any:
    try:
        return env.driver().vm(name)
    except NotFound:
        return None


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def task_env(cfg: AgentConfig) -> TaskEnv:
    """The agent's task environment outside `agent run` (its store, driver and TLS)."""
    from standby.agent.tasks import TaskEnv
    from standby.replication.store import ReplicaStore
    from standby.replication.tls import Identity, client_context

    driver: list[Any] = []

    def get_driver() -> Any:
        if not driver:
            from standby.drivers.libvirt.driver import LibvirtDriver

            driver.append(LibvirtDriver(cfg.libvirt_uri, cfg.tracking_dir))
        return driver[0]

    def ctx() -> Any:
        return client_context(Identity(cfg.cert_path, cfg.key_path, cfg.ca_path))

    return TaskEnv(ReplicaStore(cfg.replicas_dir), cfg.state_dir, get_driver, ctx, cfg.owns)


def mark_reported(cfg: AgentConfig, rec: BreakGlassRecord) -> None:
    rec.reported_at = time.time()
    save(cfg, rec)


__all__ = ["BreakGlassRecord", "answering_control_planes", "failover", "load", "mark_reported",
           "unreported"]
