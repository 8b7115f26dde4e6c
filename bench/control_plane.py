#!/usr/bin/env python
"""Benchmark of the control plane at scale (issues 5 and 11): 5,000 simulated protected
items on SQLite and on PostgreSQL, API latency under load, cycles applied and the control
plane's CPU per 100 items.

    .venv/bin/python bench/control_plane.py [--json] [--items N] [--backend sqlite|postgresql|both]
        [--workers N] [--contract desired|tasks] [--operator-rate R] [--reps N] [--quick]

What is real and what is simulated. The control plane is the real one: a data dir made by
`standby.api.server.init_data_dir`, and `serve()` (the HTTPS API under uvicorn, client
certificates, the store, the services; `--workers N` processes on PostgreSQL) in a process
of its own, on a SQLite store in a temporary data dir and on a throwaway PostgreSQL cluster
(`standby.testing.postgres`). The agents are simulated: `ScriptedAgentDouble` is a scripted
test double of `standby agent run` (5,000 real VMs cannot run on 2 cores). It registers over
the real API (registration key, CSR, the certificate it is issued), reports an inventory
(PUT /agent/inventory, again every `--inventory-seconds` if asked) and heartbeats. Under
`--contract desired` (the default, the real agent's way since issue 11) it long-polls GET
/agent/desired, "runs" each VM's cycle when the desired state's copy frequency (30 s by
default) says so, and posts the cycles' reports (`contract.CycleReport`, of the real
agent's shape) in batches every 2 s or at 50 (POST /agent/reports); the bench reads the
server process's CPU over a steady phase of agents alone (`--steady`). Under `--contract
tasks` (agents that do not own their cycles): the scheduler is the real
`Scheduler(store, settings).tick()`, run by this process every `tick_seconds` (1 s) so that
its CPU can be measured per tick (`time.thread_time` of the ticking thread; the server's
own scheduler is given a period longer than the run), and the double claims tasks with
its client certificate about every second (4 at a time, again at once while full batches
come back) and answers each at once with a well-formed result of the real agent's shape (a
cycle: `VmCycleResult.as_dict()` plus points, point_at and bytes_sent). Doubles run on
threads of a separate load process, with the operator clients, so that they do not share
a GIL with the server.

Population: `--items` (default 5,000) VMs, `--vms-per-host` (100) on each primary host
(50 hosts), as many secondary hosts, one double per host, `--hosts-per-cloud` (5) hosts
per cloud (10 primary clouds, each paired with a secondary cloud: before issue 11 an
agent's PUT /agent/inventory re-synced its whole cloud, so one cloud of 5,000 VMs would
have taken most of the run to report); a policy (POST /policies: copy frequency
`--copy-frequency`, default 30 s under --contract desired, 300 s under tasks; latest point
only) and the pairings (POST /pairings). The
doubles report their inventory once (`--inventory-seconds 60` makes them re-send it as
the real agent does; inventory_round_s is what one such round costs). Protected items are created in bulk through `store.repo.items.create`
(protected, with a recovery point, first cycles spread over one copy period): POST /items
runs a readiness check and a protect job per VM, which at this scale would take longer
than the rest of the run (the output says so under "items_created_via").

Each repetition (`--reps`, default 3): after a warm-up, `--clients` (8) operator threads
send `--requests` reads (default: a minute of the rate) and go on for at least
`--min-window` seconds: GET /status, GET /items?limit=100, GET /items/{ref}, GET
/jobs?limit=50, GET /alerts?open=true (weights 15, 25, 35, 15, 10), at `--operator-rate`
(20 a second over all clients: a busy operations room) with Poisson arrivals, each timed
from when it was due, so that a request held up by a slow one counts its wait (no
coordinated omission); `--operator-rate 0` sends back to back (2,000 by default), which
measures how much the server answers when saturated, not its latency. Every request in
that window is timed at the client (keep-alive HTTPS connections, handshakes outside the
timings): the operator reads and the doubles' heartbeat, claim, result, report and
inventory calls. An API whose GET
/items ignores `limit` lists every item on each such call: it is then timed once
(items_list_probe_ms) and left out of the mix (operator_mix says what ran). After each
window the scheduler stops, the doubles answer what they hold, and the run checks that
every cycle dispatched was applied (the items' replicated bytes add up to the results'
bytes_sent). Then a burst (`--no-burst` skips it): `--burst-items` (500, the
scheduler's dispatch batch per tick) made due at once, timed until all of their cycles
are applied (`--burst-seconds` at most): the control plane's cycle capacity.

Figures per backend (medians over the repetitions): api_p50_ms, api_p95_ms, api_p99_ms
(every request in the window), operator_p99_ms, agent_p99_ms, api_requests_per_s,
by_endpoint ({name: {n, p50_ms, p99_ms}}, of the middle repetition),
scheduler_tick_cpu_ms and scheduler_tick_wall_ms (median tick),
scheduler_cpu_ms_per_100_items (median tick CPU / (items / 100)),
scheduler_ticks_per_s_capacity (1 / median tick wall time), scheduler_cpu_fraction (tick
CPU / window), cycles_due_per_s (items / copy frequency), cycles_dispatched_per_s,
cycles_applied_per_s, cycle_burst_per_s, cycle_burst_s, cycle_burst_complete;
cycles_dispatched, cycles_applied, cycle_tasks_by_state, all_cycles_applied, http_errors;
populate_s, inventory_put_ms; items_list_paged, items_list_probe_count,
items_list_probe_ms, operator_mix; runs (each repetition's figures). Top level: items,
hosts, agents, items_created_via, params (with the load average at the start and the end:
other work on the machine shows there), and `<backend>_error` when a backend could not
run. The bench reports; it does not assert. Everything it creates (temp dirs, processes,
the PostgreSQL cluster) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402

from standby.replication import tls  # noqa: E402

API = "/api/v1"
VMS_PER_HOST = 100  # default of --vms-per-host: 5,000 items on 50 primary hosts
SERVER_TICK_SECONDS = 86400.0  # the server's own scheduler: this process ticks instead
CYCLE_BYTES = 1 << 20  # bytes_sent of every simulated cycle: applied cycles = sum(bytes_replicated) / this
CLAIM_MAX = 4  # tasks asked for per claim (the contract's example)
REPORT_SECONDS = 2.0  # agent/cycles.py: reports posted every 2 s ...
REPORT_BATCH = 50  # ... or as soon as 50 wait
DESIRED_WAIT = 25.0  # agent/cycles.py's long-poll
# Operators' offered load: a busy operations room (consoles and dashboards refreshing, scripts
# polling) is a few requests a second; 20/s leaves headroom. --operator-rate 0 saturates.
OPERATOR_RATE = 20.0
OPERATOR_MIX = [("status", 15), ("items_page", 25), ("item", 35), ("jobs", 15), ("alerts", 10)]
SITE_A, SITE_B = "bench-site-a", "bench-site-b"
SERVER_A, SERVER_B = "bench-mgr-a", "bench-mgr-b"
HOSTS_PER_CLOUD = 5  # default of --hosts-per-cloud: 5,000 items in 10 pairs of clouds


def cloud_name(role: str, index: int) -> str:
    return f"bench-{'primary' if role == 'primary' else 'secondary'}-{index:02d}"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------- timing


@dataclass
class Timings:
    """Client-side request timings: (name, wall start, seconds, HTTP status)."""

    rows: list[tuple[str, float, float, int]] = field(default_factory=list)

    def timed(self, name: str, fn: Callable[[], httpx.Response], since: float | None = None) -> httpx.Response:
        """`fn()` timed from now, or from `since` (a perf_counter time: when an open-loop
        client meant to send it, so that a late start counts as waiting)."""
        p0 = time.perf_counter() if since is None else since
        t0 = time.time() - (time.perf_counter() - p0)
        try:
            r = fn()
        except httpx.HTTPError as e:  # a timeout, a dropped connection: counted, status 599
            self.rows.append((name, t0, time.perf_counter() - p0, 599))
            raise Transient(f"{name}: {type(e).__name__}: {e}") from e
        self.rows.append((name, t0, time.perf_counter() - p0, r.status_code))
        return r


class Transient(Exception):
    """A request the control plane did not answer (5xx, timeout): the doubles try again at
    their next poll, as the real agent does; the run counts these in http_errors."""


def _check(r: httpx.Response, what: str) -> Any:
    if r.status_code >= 500:
        raise Transient(f"{what}: HTTP {r.status_code}: {r.text[:300]}")
    if r.status_code >= 400:
        raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json() if r.content else None


def _ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


# ---------------------------------------------------------------------------- the agent double


class ScriptedAgentDouble:
    """A scripted test double of one agent (`standby agent run` on one host).

    It stands in for the real agent because 5,000 real VMs cannot run on this 2-core
    machine: it speaks the real agent API over HTTPS with a certificate the control
    plane issued to it (registration with a key and a CSR), reports a made-up inventory,
    heartbeats, claims its tasks and answers them at once with well-formed results (the
    real agent's result shapes, docs/control-plane.md "Tasks"); it never replicates a
    byte. Not thread-safe: one thread drives a double at a time."""

    def __init__(self, name: str, *, role: str, base_url: str, ca: Path, workdir: Path, vms: int = 0,
                 cloud: str = "") -> None:
        self.name = name
        self.vms = vms
        self.host = name
        self.role = role  # "primary" or "secondary"
        self.cloud = cloud
        self.site = SITE_A if role == "primary" else SITE_B
        self.server = SERVER_A if role == "primary" else SERVER_B
        self.base_url = base_url
        self.ca = ca
        self.dir = workdir / name
        self.address = f"127.0.0.1:{7443}"
        self.client: httpx.Client | None = None
        self.heartbeat_seconds = 10.0
        self.next_heartbeat = 0.0
        self.next_poll = 0.0
        self.next_inventory = 0.0
        self.answered: dict[str, int] = {}
        self.bytes_reported = 0
        # the desired-state contract (agents own their cycles)
        self.owns_cycles = False
        self.desired_version: str | None = None
        self.desired_vms: dict[int, tuple[str, int]] = {}  # item id -> (vm, copy frequency s)
        self.next_due: dict[int, float] = {}
        self.pending: list[dict[str, Any]] = []
        self.last_post = 0.0
        self.cycles_made = 0
        self.cycles_applied = 0
        self.seq = 0
        self.rnd = random.Random(name)
        self._lock = threading.Lock()

    # -- registration (the real path: key + CSR, the private key stays here)

    def register(self, key: str, timings: Timings | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        key_pem, csr_pem = tls.make_key_and_csr(self.name)
        body = {"key": key, "name": self.name, "kind": "agent", "host": self.host, "site": self.site,
                "server": self.server, "cloud": self.cloud, "address": self.address,
                "csr_pem": csr_pem.decode(), "version": "0.1.0"}
        with httpx.Client(base_url=self.base_url, verify=_ctx(self.ca), timeout=60) as c:
            r = c.post(f"{API}/agents/register", json=body)
        out = _check(r, f"register {self.name}")
        (self.dir / "agent.key").write_bytes(key_pem)
        (self.dir / "agent.crt").write_text(out["cert_pem"])
        self.heartbeat_seconds = float(out.get("heartbeat_seconds") or 10.0)

    def connect(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, timeout=60,
                                   verify=_ctx(self.ca, self.dir / "agent.crt", self.dir / "agent.key"))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- what `standby agent run` sends

    def inventory_body(self, vms: int) -> dict[str, Any]:
        vm_rows = []
        for j in range(vms):
            vm = vm_name(self.host, j)
            vm_rows.append({
                "name": vm, "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"standby-bench/{vm}")),
                "power_state": "running",
                "disks": {"vda": {"format": "qcow2", "size_gib": 20, "kind": "virtual"}},
                "nics": [{"network": "bench-net", "address_families": ["ipv4"]}],
            })
        host = {"name": self.host, "platform": "kvm", "host_group": None, "replication_address": self.address,
                "storage_free_bytes": 4 << 40, "facts": {"libvirt_version": "9.0.0", "qemu_version": "7.2.0"},
                "vms": vm_rows}
        return {"hosts": [host]}

    def put_inventory(self, t: Timings) -> Any:
        assert self.client is not None
        body = self.inventory_body(self.vms)
        return _check(t.timed("inventory", lambda: self.client.put(f"{API}/agent/inventory",  # type: ignore[union-attr]
                                                                    json=body)), f"inventory of {self.name}")

    def heartbeat(self, t: Timings) -> None:
        assert self.client is not None
        body = {"version": "0.1.0", "storage_free_bytes": 4 << 40, "storage_total_bytes": 8 << 40,
                "facts": {"owns_cycles": True} if self.owns_cycles else {}}
        c = self.client
        out = _check(t.timed("heartbeat", lambda: c.post(f"{API}/agent/heartbeat", json=body)),
                     f"heartbeat of {self.name}")
        self.heartbeat_seconds = float(out.get("heartbeat_seconds") or self.heartbeat_seconds)
        self.next_heartbeat = time.monotonic() + self.heartbeat_seconds

    def poll(self, t: Timings, max_tasks: int = CLAIM_MAX) -> int:
        """Claim tasks and answer each at once, again while full batches come back (the
        real agent claims again as soon as a worker is free); how many were answered."""
        assert self.client is not None
        n = 0
        while True:
            out = _check(t.timed("claim", lambda: self.client.post(  # type: ignore[union-attr]
                f"{API}/agent/tasks/claim", json={"max": max_tasks})), f"claim of {self.name}")
            tasks = out["tasks"]
            for task in tasks:
                body = self.answer(task)
                _check(t.timed("result", lambda: self.client.post(  # type: ignore[union-attr]
                    f"{API}/agent/tasks/{task['id']}/result", json=body)), f"result of task {task['id']}")
                self.answered[task["kind"]] = self.answered.get(task["kind"], 0) + 1
            n += len(tasks)
            if len(tasks) < max_tasks:
                return n

    # -- the desired-state contract: what `agent/cycles.py` does, at its rates

    def fetch_desired(self, t: Timings, wait: float) -> None:
        """GET /agent/desired: at once without a version (timed as "desired"), else a
        long-poll that answers on a change (timed as "desired_wait": mostly waiting)."""
        assert self.client is not None
        params: dict[str, Any] = ({"have": self.desired_version, "wait": round(wait * self.rnd.uniform(0.75, 1.0), 1),
                                   "if_changed": "true"} if self.desired_version else {})
        name = "desired_wait" if params else "desired"
        out = _check(t.timed(name, lambda: self.client.get(f"{API}/agent/desired",  # type: ignore[union-attr]
                                                           params=params, timeout=wait + 30)),
                     f"desired state of {self.name}")
        if out is None:  # 204: still the version it has
            return
        now = time.monotonic()
        with self._lock:
            if out["version"] == self.desired_version:
                return
            self.desired_version = out["version"]
            vms = {v["item_id"]: (v["cycle"]["vm"], int(v["copy_frequency_seconds"])) for v in out["vms"]}
            for item_id, (_vm, freq) in vms.items():
                if item_id not in self.next_due:  # first seen: spread over one period, as running agents are
                    self.next_due[item_id] = now + self.rnd.random() * max(freq, 1)
            for gone in set(self.next_due) - set(vms):
                del self.next_due[gone]
            self.desired_vms = vms

    def adopt(self, other: ScriptedAgentDouble) -> None:
        """Take the desired VMs another instance (the long-polling one) fetched."""
        with other._lock:
            vms, due, version = dict(other.desired_vms), dict(other.next_due), other.desired_version
        with self._lock:
            self.desired_version = version
            for item_id in vms:
                self.next_due.setdefault(item_id, due[item_id])
            for gone in set(self.next_due) - set(vms):
                del self.next_due[gone]
            self.desired_vms = vms

    def run_cycles(self, now: float) -> int:
        """The cycles due now, each made at once (a well-formed report of the real agent's
        shape); the next one copy interval after this one started."""
        made = 0
        with self._lock:
            for item_id, due in list(self.next_due.items()):
                if due > now:
                    continue
                vm, freq = self.desired_vms[item_id]
                self.seq += 1
                started = time.time()
                result = cycle_result({"vm": vm, "consistency": "crash"}, self.seq)
                self.pending.append({"cycle_id": f"{self.name}-{self.seq}", "item_id": item_id, "vm": vm, "ok": True,
                                     "started_at": started, "finished_at": started + 0.001, "consistency": "crash",
                                     "result": result})
                self.next_due[item_id] = due + max(freq, 1)
                if self.next_due[item_id] < now:  # fell behind: no catch-up burst
                    self.next_due[item_id] = now + max(freq, 1)
                made += 1
            self.cycles_made += made
        return made

    def post_reports(self, t: Timings, force: bool = False) -> int:
        """POST /agent/reports every REPORT_SECONDS, or at once when REPORT_BATCH wait."""
        assert self.client is not None
        now = time.monotonic()
        with self._lock:
            if not self.pending or (not force and len(self.pending) < REPORT_BATCH
                                    and now - self.last_post < REPORT_SECONDS):
                return 0
            batch = self.pending[:500]
            body = {"desired_version": self.desired_version, "active": sorted(self.desired_vms), "running": [],
                    "cycles": batch}
        out = _check(t.timed("reports", lambda: self.client.post(f"{API}/agent/reports",  # type: ignore[union-attr]
                                                                  json=body)), f"reports of {self.name}")
        with self._lock:
            del self.pending[:len(batch)]
            self.last_post = now
            self.cycles_applied += int(out.get("applied", 0))
            self.bytes_reported += CYCLE_BYTES * len(batch)
        return len(batch)

    # -- scripted answers

    def answer(self, task: dict[str, Any]) -> dict[str, Any]:
        kind, params = task["kind"], task.get("params") or {}
        if kind == "cycle":
            self.bytes_reported += CYCLE_BYTES
            return {"ok": True, "result": cycle_result(params, task["id"])}
        if kind == "prune":
            return {"ok": True, "result": {"removed": {d: [] for d in params.get("disk_ids", [])}}}
        if kind == "delete_replica":
            return {"ok": True, "result": {"deleted": list(params.get("disk_ids", []))}}
        if kind == "list_points":
            return {"ok": True, "result": {"points": {d: [] for d in params.get("disk_ids", [])}}}
        if kind in ("seed_export", "seed_import"):
            return {"ok": True, "result": {"bytes": 0}}
        return {"ok": False, "result": {}, "error": f"the bench's agent double does not do {kind!r} tasks",
                "error_type": "Refused"}


def vm_name(host: str, j: int) -> str:
    return f"{host}-vm{j:03d}"


def cycle_result(params: dict[str, Any], task_id: int) -> dict[str, Any]:
    """What the real agent returns for a cycle (standby.agent.tasks: `VmCycleResult.as_dict()`
    plus points, point_at, bytes_sent), built from the real result classes: one disk (vda),
    an incremental cycle of CYCLE_BYTES on the wire."""
    from standby.agent.replicate import DiskCycle, VmCycleResult, disk_id_for
    from standby.replication.sender import CycleResult

    vm = str(params.get("vm", "?"))
    disk_id = disk_id_for(vm, "vda")
    point = f"p{task_id:012d}"
    cr = CycleResult(disk_id=disk_id, kind="extents", point_id=point, point_seq=task_id, base_point=None,
                     cycle_id=f"c{task_id}", resumed=False, digest="0" * 32, size=20 << 30, streams=1,
                     bytes_examined=CYCLE_BYTES, bytes_read=CYCLE_BYTES, wire_bytes=CYCLE_BYTES,
                     payload_bytes=CYCLE_BYTES, data_blocks=CYCLE_BYTES >> 16, zero_blocks=0, skipped_blocks=0,
                     resumed_blocks=0, baseline_from="point", seconds=0.001)
    res = VmCycleResult(vm=vm, checkpoint=f"standby-{task_id}", base_checkpoint=None,
                        consistency=str(params.get("consistency", "crash")).replace("auto", "crash"),
                        completed=True, seconds=0.001, disks=[DiskCycle("vda", disk_id, "extents", None, cr)], notes=[])
    out = res.as_dict()
    out["points"] = {disk_id: point}
    out["point_at"] = iso(time.time())
    out["bytes_sent"] = CYCLE_BYTES
    return out


# ---------------------------------------------------------------------------- load (child process)


def load_main(cfg_path: str) -> None:
    """The load generator (its own process, so that its threads do not share a GIL with the
    scheduler): the doubles' driver threads and the operator clients. Reads its config
    from a JSON file, writes its timings to cfg["out"]. Phases, signalled with files:
    warm up for cfg["warmup_s"], then the window (operator requests until cfg["requests"]
    are done; the doubles keep polling), then `window.done` is written; the doubles keep
    answering until `drain` appears and a whole round of claims returns nothing."""
    cfg = json.loads(Path(cfg_path).read_text())
    work = Path(cfg["workdir"])
    ca = Path(cfg["ca"])
    doubles = [ScriptedAgentDouble(n, role=r, base_url=cfg["url"], ca=ca, workdir=work, vms=v)
               for n, r, v in cfg["agents"]]
    owning = cfg.get("contract") == "desired"
    for d in doubles:
        d.owns_cycles = owning
        d.connect()
    stop = threading.Event()
    drain = threading.Event()
    n_threads = max(1, min(cfg["double_threads"], len(doubles)))
    idle_rounds = [0] * n_threads
    t_doubles = [Timings() for _ in range(n_threads)]
    errors: list[str] = []
    transient: list[str] = []
    rnd = random.Random(cfg["seed"])
    for d in doubles:  # spread the first polls, heartbeats and inventories over their periods
        d.next_poll = time.monotonic() + rnd.random() * cfg["poll_seconds"]
        d.next_heartbeat = time.monotonic() + rnd.random() * d.heartbeat_seconds
        d.next_inventory = (time.monotonic() + rnd.random() * cfg["inventory_seconds"]
                            if cfg["inventory_seconds"] > 0 else float("inf"))

    def drive(k: int) -> None:
        mine = doubles[k::n_threads]
        t = t_doubles[k]
        try:
            while not stop.is_set():
                now = time.monotonic()
                answered = 0
                for d in mine:
                    try:
                        if now >= d.next_inventory and not drain.is_set():
                            d.next_inventory = now + cfg["inventory_seconds"]
                            d.put_inventory(t)
                        if owning:
                            if not drain.is_set():
                                d.run_cycles(now)
                            answered += d.post_reports(t, force=drain.is_set())
                        elif now >= d.next_poll or drain.is_set():
                            d.next_poll = now + cfg["poll_seconds"]
                            answered += d.poll(t)
                    except Transient as e:
                        transient.append(str(e))
                        answered += 1  # not idle: what it held is handed back at its next claim
                if drain.is_set():
                    idle_rounds[k] = idle_rounds[k] + 1 if answered == 0 else 0
                    continue
                if owning:
                    time.sleep(0.05)
                    continue
                nxt = min(min(d.next_poll, d.next_inventory) for d in mine)
                time.sleep(max(0.0, min(0.2, nxt - time.monotonic())))
        except Exception:  # noqa: BLE001 - reported to the parent
            errors.append(traceback.format_exc())

    def heartbeats() -> None:
        """Heartbeats on a thread of their own, as the real agent sends them: never queued
        behind another double's claims (httpx clients may be shared between threads)."""
        try:
            while not stop.is_set():
                for d in doubles:
                    if time.monotonic() >= d.next_heartbeat:
                        d.next_heartbeat = time.monotonic() + d.heartbeat_seconds
                        try:
                            d.heartbeat(t_beats)
                        except Transient as e:
                            transient.append(str(e))
                stop.wait(max(0.0, min(0.5, min(d.next_heartbeat for d in doubles) - time.monotonic())))
        except Exception:  # noqa: BLE001 - reported to the parent
            errors.append(traceback.format_exc())

    t_desired = [Timings() for _ in doubles]

    def follow(i: int) -> None:
        """One double's desired state, long-polled as agent/cycles.py does (its own connection)."""
        d = doubles[i]
        poller = ScriptedAgentDouble(d.name, role=d.role, base_url=cfg["url"], ca=ca, workdir=work)
        poller.connect()
        try:
            while not stop.is_set():
                try:
                    poller.fetch_desired(t_desired[i], DESIRED_WAIT)
                    d.adopt(poller)
                except Transient as e:
                    transient.append(str(e))
                    stop.wait(1.0)
                except httpx.HTTPError:
                    if stop.is_set():
                        return
                    raise
        except Exception:  # noqa: BLE001 - reported to the parent
            if not stop.is_set():
                errors.append(traceback.format_exc())
        finally:
            poller.close()

    t_beats = Timings()
    drivers = [threading.Thread(target=drive, args=(k,), daemon=True) for k in range(n_threads)]
    drivers.append(threading.Thread(target=heartbeats, daemon=True))
    followers = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(len(doubles))] if owning else []
    for th in followers:
        th.start()
    if owning:  # every double has its first desired state before the clock starts
        deadline = time.monotonic() + 300
        while any(d.desired_version is None for d in doubles) and time.monotonic() < deadline and not errors:
            time.sleep(0.1)
    for th in drivers:
        th.start()
    time.sleep(cfg["warmup_s"])
    if cfg.get("steady_s"):  # the agents alone: what the items cost the control plane
        (work / "steady.start").write_text("")
        made_s0, s0 = sum(d.cycles_made for d in doubles), time.time()
        time.sleep(cfg["steady_s"])
        steady = {"start": s0, "end": time.time(), "made": sum(d.cycles_made for d in doubles) - made_s0}
        (work / "steady.done").write_text(json.dumps(steady))

    # -- the window: operator reads
    token = cfg["token"]
    refs = cfg["item_refs"]
    mix = [(n, w) for n, w in OPERATOR_MIX if n in cfg["mix"]]
    names = [n for n, _ in mix]
    weights = [w for _, w in mix]
    per_client = [cfg["requests"] // cfg["clients"] + (1 if i < cfg["requests"] % cfg["clients"] else 0)
                  for i in range(cfg["clients"])]
    t_ops = [Timings() for _ in range(cfg["clients"])]
    listed: list[int] = []  # items per GET /items?limit=100 (does the API page?)

    def operator(i: int) -> None:
        r = random.Random(cfg["seed"] * 1000 + i)
        t = t_ops[i]
        try:
            with httpx.Client(base_url=cfg["url"], verify=_ctx(ca), timeout=60,
                              headers={"Authorization": f"Bearer {token}"}) as c:
                c.get(f"{API}/health")  # the TLS handshake, outside the timings
                done = 0
                # open loop: Poisson arrivals at this client's share of the rate, each timed
                # from when it was due (no coordinated omission); closed loop: back to back
                rate = cfg["operator_rate"] / cfg["clients"]
                due = time.perf_counter()
                while done < per_client[i] or time.time() - w0 < cfg["min_window_s"]:
                    done += 1
                    since = None
                    if rate > 0:
                        due += r.expovariate(rate)
                        time.sleep(max(0.0, due - time.perf_counter()))
                        since = due
                    what = r.choices(names, weights)[0]
                    if what == "status":
                        resp = t.timed(what, lambda: c.get(f"{API}/status"), since)
                    elif what == "items_page":
                        resp = t.timed(what, lambda: c.get(f"{API}/items", params={"limit": 100}), since)
                        if resp.status_code == 200:
                            listed.append(len(resp.json()["items"]))
                    elif what == "item":
                        ref = r.choice(refs)
                        resp = t.timed(what, lambda: c.get(f"{API}/items/{ref}"), since)
                    elif what == "jobs":
                        resp = t.timed(what, lambda: c.get(f"{API}/jobs", params={"limit": 50}), since)
                    else:
                        resp = t.timed(what, lambda: c.get(f"{API}/alerts", params={"open": "true"}), since)
                    if resp.status_code >= 400:
                        raise RuntimeError(f"GET {what}: HTTP {resp.status_code}: {resp.text[:300]}")
        except Exception:  # noqa: BLE001
            errors.append(traceback.format_exc())

    (work / "window.start").write_text("")
    made0 = sum(d.cycles_made for d in doubles)
    w0 = time.time()
    ops = [threading.Thread(target=operator, args=(i,)) for i in range(cfg["clients"])]
    for th in ops:
        th.start()
    for th in ops:
        th.join()
    w1 = time.time()
    made1 = sum(d.cycles_made for d in doubles)
    (work / "window.done").write_text(json.dumps({"start": w0, "end": w1}))

    # -- drain: answer what the scheduler dispatched, until it stopped and nothing is left
    deadline = time.monotonic() + cfg["drain_timeout_s"]
    while not (work / "drain").exists() and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    drain.set()
    while time.monotonic() < deadline and not errors and min(idle_rounds) < 2:
        time.sleep(0.05)
    stop.set()
    for th in drivers:
        th.join(30)
    for th in followers:
        th.join(DESIRED_WAIT + 5)
    for d in doubles:
        d.close()
    rows = [row for t in [*t_ops, *t_doubles, t_beats, *t_desired] for row in t.rows]
    Path(cfg["out"]).write_text(json.dumps({
        "window": [w0, w1], "rows": rows, "errors": errors, "transient": transient[:20],
        "answered": {k: sum(d.answered.get(k, 0) for d in doubles) for k in {"cycle", "prune", "delete_replica",
                                                                                "list_points"}},
        "bytes_reported": sum(d.bytes_reported for d in doubles),
        "cycles_made": sum(d.cycles_made for d in doubles), "cycles_made_in_window": made1 - made0,
        "cycles_acked_applied": sum(d.cycles_applied for d in doubles),
        "reports_pending": sum(len(d.pending) for d in doubles),
        "drained": min(idle_rounds) >= 2,
        "items_listed": max(listed) if listed else None,
    }))


# ---------------------------------------------------------------------------- the control plane under test


class ControlPlane:
    """A real control plane: `standby server init` + `standby server run` (a subprocess)."""

    def __init__(self, workdir: Path, db_url: str | None) -> None:
        from standby.demo.local import free_port

        self.workdir = workdir
        self.data_dir = workdir / "control-plane"
        self.db_url = db_url
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"

    @property
    def ca(self) -> Path:
        return self.data_dir / "ca" / "ca.crt"

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def settings(self, tick_seconds: float = 1.0) -> Any:
        from standby.orchestration.settings import ServerSettings

        return ServerSettings(data_dir=self.data_dir, db_url=self.db_url, listen=f"127.0.0.1:{self.port}",
                              tick_seconds=tick_seconds)

    def init(self) -> None:
        from standby.api.server import init_data_dir

        init_data_dir(self.settings())

    def start(self, timeout: float = 60.0, *, tick_seconds: float = SERVER_TICK_SECONDS, workers: int = 1) -> None:
        # `standby.api.server.serve` in a process of its own (the `_server` mode of this
        # file). Under the task contract its scheduler ticks once a day: this process runs
        # (and measures) the ticks; under the desired-state one it ticks as it does in use.
        argv = [sys.executable, str(Path(__file__).resolve()), "_server", str(self.data_dir), str(tick_seconds),
                str(workers)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, verify=_ctx(self.ca), timeout=5) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the control plane exited ({self.proc.returncode}):\n{self.tail()}")
                try:
                    if c.get(f"{API}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the control plane did not answer in {timeout:.0f} s:\n{self.tail()}")
                time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the control plane's processes (its workers too)."""
        if self.proc is None:
            return 0.0
        pids = [self.proc.pid]
        try:
            pids += [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except FileNotFoundError:
            pass
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (after the state field)
        return total / os.sysconf("SC_CLK_TCK")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        self.proc = None


# ---------------------------------------------------------------------------- one backend


class BackendRun:
    def __init__(self, args: argparse.Namespace, backend: str, workdir: Path, db_url: str | None) -> None:
        self.a = args
        self.backend = backend
        self.workdir = workdir
        self.cp = ControlPlane(workdir, db_url)
        self.store: Any = None
        self.doubles: list[ScriptedAgentDouble] = []
        self.item_refs: list[str] = []
        self.n_items = 0
        self.mix = [n for n, _ in OPERATOR_MIX]

    # -- population

    def populate(self) -> dict[str, Any]:
        a = self.a
        t0 = time.perf_counter()
        self.cp.init()
        if a.contract == "desired":
            self.cp.start(tick_seconds=a.tick_seconds, workers=a.workers)
        else:
            self.cp.start(workers=a.workers)
        from standby.store import open_store

        self.store = open_store(self.cp.settings().url)
        hosts = max(1, -(-a.items // a.vms_per_host))
        op = httpx.Client(base_url=self.cp.url, verify=_ctx(self.cp.ca), timeout=60,
                          headers={"Authorization": f"Bearer {self.cp.token}"})
        try:
            key = _check(op.post(f"{API}/registration-keys", json={"description": "bench doubles", "valid_days": 1}),
                         "registration key")["key"]
            agents_dir = self.workdir / "agents"
            clouds = -(-hosts // a.hosts_per_cloud)
            for i in range(hosts):
                for role, prefix in (("primary", "bench-a"), ("secondary", "bench-b")):
                    self.doubles.append(ScriptedAgentDouble(f"{prefix}{i:03d}", role=role, base_url=self.cp.url,
                                                            ca=self.cp.ca, workdir=agents_dir,
                                                            cloud=cloud_name(role, i // a.hosts_per_cloud)))
            # Agents register concurrently, as a fleet being installed does.
            with ThreadPoolExecutor(a.clients) as pool:
                list(pool.map(lambda d: d.register(key), self.doubles))
            log(f"{self.backend}: {len(self.doubles)} agent doubles registered ({time.perf_counter() - t0:.1f} s)")
            t = Timings()
            left = a.items
            primary_puts: list[float] = []  # ms of each primary's PUT, in order (its cloud growing)
            for d in self.doubles:
                d.connect()
                d.vms = min(a.vms_per_host, left) if d.role == "primary" else 0
                left -= d.vms
                d.put_inventory(t)
                if d.role == "primary":
                    primary_puts.append(t.rows[-1][2] * 1000)
                d.heartbeat(t)
                d.close()
            inv_ms = [row[2] * 1000 for row in t.rows if row[0] == "inventory"]
            # The last host of the first cloud reports into a cloud of hosts_per_cloud hosts.
            full = primary_puts[min(len(primary_puts), a.hosts_per_cloud) - 1]
            log(f"{self.backend}: inventory of {a.items} VMs in {clouds} primary clouds reported (PUT /agent/inventory "
                f"of a primary: first {primary_puts[0]:.0f} ms, into a full cloud {full:.0f} ms) "
                f"({time.perf_counter() - t0:.1f} s)")
            _check(op.post(f"{API}/policies", json={"name": "bench", "copy_frequency_seconds": a.copy_frequency,
                                                    "recovery_point_retention_hours": 0}), "policy")
            pairings = {}
            for c in range(clouds):
                body = {"primary_cloud": cloud_name("primary", c), "secondary_cloud": cloud_name("secondary", c),
                        "policy": "bench"}
                pairings[c] = _check(op.post(f"{API}/pairings", json=body), "pairing")["id"]
            self.n_items = self._create_items(pairings)
            for d in self.doubles:  # populating may have taken longer than the heartbeat timeout
                d.owns_cycles = a.contract == "desired"
                d.connect()
                d.heartbeat(t)
                d.close()
            log(f"{self.backend}: {self.n_items} protected items created ({time.perf_counter() - t0:.1f} s)")
        finally:
            op.close()
        return {"populate_s": round(time.perf_counter() - t0, 2), "clouds": 2 * clouds,
                "inventory_put_ms": round(med(inv_ms), 1),
                "inventory_put_full_cloud_ms": round(full, 1),
                # one round of every primary's inventory, as the real agents send every 60 s
                "inventory_round_s": round(sum(primary_puts) / 1000, 2)}

    def _create_items(self, pairings: dict[int, int]) -> int:
        from sqlalchemy import select

        from sqlalchemy import update

        from standby.contract import disk_id_for
        from standby.store.models import Host, Policy, ProtectedItem, Vm
        from standby.store.repo import items

        now = datetime.now(UTC)
        period = max(self.a.copy_frequency, 1)
        rnd = random.Random(self.a.seed)
        with self.store.read() as s:
            policy_id = s.scalars(select(Policy.id).where(Policy.name == "bench")).one()
            host_ids = dict(s.execute(select(Host.name, Host.id)).all())
            vms = s.execute(select(Vm.id, Vm.name, Host.name).join(Host, Host.id == Vm.host_id)
                            .where(Host.name.like("bench-a%")).order_by(Vm.id)).all()
        # Transactions of 250 items: one session holding thousands of objects makes every
        # autoflush scan them all.
        for chunk in range(0, len(vms), 250):
            with self.store.transaction() as s:
                for vm_id, vm, host in vms[chunk : chunk + 250]:
                    index = int(host[len("bench-a"):])
                    items.create(s, vm_id=vm_id, pairing_id=pairings[index // self.a.hosts_per_cloud],
                                 policy_id=policy_id, state="protected",
                                 secondary_host_id=host_ids[f"bench-b{index:03d}"],
                                 details={"disk_ids": [disk_id_for(vm, "vda")]},
                                 next_cycle_at=now + timedelta(seconds=rnd.random() * period), now=now)
                    self.item_refs.append(vm)
        with self.store.transaction() as s:  # as if each had its initial replication behind it
            s.execute(update(ProtectedItem).values(last_recovery_point_id="p-seed", last_recovery_point_at=now,
                                                   rpo_seconds=0.0, last_cycle_at=now))
        return len(vms)

    def probe_item_list(self) -> dict[str, Any]:
        """GET /items?limit=100 once. An API that ignores the limit lists every item on every
        such request (at 5,000 items, seconds each): then the load leaves it out (said in
        the output), or the windows would time that one request and little else."""
        with httpx.Client(base_url=self.cp.url, verify=_ctx(self.cp.ca), timeout=600,
                          headers={"Authorization": f"Bearer {self.cp.token}"}) as c:
            c.get(f"{API}/health")
            t0 = time.perf_counter()
            r = c.get(f"{API}/items", params={"limit": 100})
            ms = (time.perf_counter() - t0) * 1000
        listed = len(_check(r, "GET /items")["items"])
        paged = listed <= 100
        if not paged:
            self.mix = [n for n in self.mix if n != "items_page"]
            log(f"{self.backend}: GET /items ignores ?limit=100 (it listed {listed} items in {ms:.0f} ms): "
                "left out of the operator mix")
        return {"items_list_paged": paged, "items_list_probe_count": listed, "items_list_probe_ms": round(ms, 1)}

    # -- counters in the store

    def counters(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from standby.store.models import ProtectedItem

        with self.store.read() as s:
            replicated = int(s.scalar(select(func.coalesce(func.sum(ProtectedItem.bytes_replicated), 0))) or 0)
            tasks = dict(s.execute(select(_task_model().state, func.count()).where(_task_model().kind == "cycle")
                                   .group_by(_task_model().state)).all())
        return {"applied": replicated // CYCLE_BYTES, "dispatched": sum(tasks.values()),
                **{f"tasks_{k}": int(v) for k, v in tasks.items()}}

    # -- the load process

    def start_load(self, work: Path, **phase: Any) -> subprocess.Popen[bytes]:
        """The load process (`load_main`) in `work`, given the doubles and this phase's sizes."""
        a = self.a
        work.mkdir()
        cfg = {"workdir": str(work), "url": self.cp.url, "ca": str(self.cp.ca), "token": self.cp.token,
               "agents": [(d.name, d.role, d.vms) for d in self.doubles], "double_threads": a.double_threads,
               "poll_seconds": a.poll_seconds, "inventory_seconds": a.inventory_seconds, "mix": self.mix,
               "item_refs": self.item_refs, "out": str(work / "load.json"), "contract": a.contract,
               "operator_rate": a.operator_rate, **phase}
        for d in self.doubles:  # their keys and certificates, where the load process looks
            (work / d.name).symlink_to(d.dir)
        (work / "cfg.json").write_text(json.dumps(cfg))
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_load", str(work / "cfg.json")],
                                stdin=subprocess.DEVNULL)

    # -- one repetition

    def repetition(self, rep: int, scheduler: Any) -> dict[str, Any]:
        a = self.a
        work = self.workdir / f"rep{rep}"
        before: dict[str, int] | None = None
        t_before = 0.0
        ticks: list[tuple[float, float, float, Any]] = []  # (wall start, cpu s, wall s, TickReport)
        load = self.start_load(work, warmup_s=a.warmup, requests=a.requests, clients=a.clients,
                               min_window_s=a.min_window, seed=a.seed + rep, drain_timeout_s=120.0)
        try:
            next_tick = time.monotonic()
            while not (work / "window.done").exists():
                if load.poll() is not None:
                    raise RuntimeError(f"the load process exited ({load.returncode}) before its window ended")
                if before is None and (work / "window.start").exists():
                    before, t_before = self.counters(), time.monotonic()
                now = time.monotonic()
                if now >= next_tick:
                    t0 = time.time()
                    c0 = time.thread_time()
                    p0 = time.perf_counter()
                    report = scheduler.tick()
                    ticks.append((t0, time.thread_time() - c0, time.perf_counter() - p0, report))
                    next_tick += a.tick_seconds
                    if next_tick < time.monotonic():  # a tick longer than the period: no catch-up burst
                        next_tick = time.monotonic()
                time.sleep(max(0.0, min(0.05, next_tick - time.monotonic())))
            mid, t_mid = self.counters(), time.monotonic()
            if before is None:
                raise RuntimeError("the load process ended its window without starting it")
            (work / "drain").write_text("")
            load.wait(180)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        res = json.loads((work / "load.json").read_text())
        if res["errors"]:
            raise RuntimeError("the load process failed:\n" + "\n".join(res["errors"][:3]))
        w0, w1 = res["window"]
        rows = [r for r in res["rows"] if w0 <= r[1] <= w1]
        in_window = [t for t in ticks if w0 <= t[0] <= w1] or ticks
        lat = [r[2] * 1000 for r in rows]
        ops = {n for n, _ in OPERATOR_MIX}
        by: dict[str, dict[str, float]] = {}
        for name in sorted({r[0] for r in rows}):
            xs = [r[2] * 1000 for r in rows if r[0] == name]
            by[name] = {"n": len(xs), "p50_ms": round(pct(xs, 50), 2), "p99_ms": round(pct(xs, 99), 2)}
        window = w1 - w0
        cpu = [t[1] for t in in_window]
        wall = [t[2] for t in in_window]
        return {
            "window_s": window, "requests": len(rows),
            "api_p50_ms": pct(lat, 50), "api_p95_ms": pct(lat, 95), "api_p99_ms": pct(lat, 99),
            "operator_p99_ms": pct([r[2] * 1000 for r in rows if r[0] in ops], 99),
            "agent_p99_ms": pct([r[2] * 1000 for r in rows if r[0] not in ops], 99),
            "api_requests_per_s": len(rows) / window,
            "by_endpoint": by,
            "scheduler_ticks": len(in_window),
            "tick_cycles_dispatched": sum(t[3].cycles_dispatched for t in in_window),
            "tick_dispatch_skipped": sum(t[3].dispatch_skipped for t in in_window),
            "tick_agents_stale_max": max((t[3].agents_stale for t in in_window), default=0),
            "tick_items_checked": max((t[3].items_checked for t in in_window), default=0),
            "scheduler_tick_cpu_ms": med(cpu) * 1000, "scheduler_tick_wall_ms": med(wall) * 1000,
            "scheduler_cpu_fraction": sum(cpu) / window,
            "cycles_dispatched_per_s": (mid["dispatched"] - before["dispatched"]) / (t_mid - t_before),
            "cycles_applied_per_s": (mid["applied"] - before["applied"]) / (t_mid - t_before),
            "http_errors": sum(1 for r in rows if r[3] >= 400),
            "drained": res["drained"],
            "items_listed_per_page": res["items_listed"],
        }

    def repetition_desired(self, rep: int) -> dict[str, Any]:
        """One repetition under the desired-state contract: the doubles run their cycles on
        their timers and report them; the control plane (its own scheduler ticking) applies
        them. Its CPU is read from /proc over the window."""
        a = self.a
        work = self.workdir / f"rep{rep}"
        load = self.start_load(work, warmup_s=a.warmup, requests=a.requests, clients=a.clients,
                               min_window_s=a.min_window, seed=a.seed + rep, drain_timeout_s=180.0,
                               steady_s=a.steady)
        before: dict[str, int] | None = None
        t_before = 0.0
        steady: dict[str, float] = {}
        try:
            while not (work / "window.done").exists():
                if load.poll() is not None:
                    raise RuntimeError(f"the load process exited ({load.returncode}) before its window ended")
                if "cpu0" not in steady and (work / "steady.start").exists():
                    steady.update(cpu0=self.cp.cpu_seconds(), t0=time.monotonic())
                if "cpu1" not in steady and (work / "steady.done").exists():
                    steady.update(cpu1=self.cp.cpu_seconds(), t1=time.monotonic())
                if before is None and (work / "window.start").exists():
                    before, t_before = self.counters(), time.monotonic()
                time.sleep(0.05)
            mid, t_mid = self.counters(), time.monotonic()
            if before is None:
                raise RuntimeError("the load process ended its window without starting it")
            (work / "drain").write_text("")
            load.wait(240)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        res = json.loads((work / "load.json").read_text())
        if res["errors"]:
            raise RuntimeError("the load process failed:\n" + "\n".join(res["errors"][:3]))
        w0, w1 = res["window"]
        # long-polls answered after their wait are waiting, not serving: left out of the latencies
        rows = [r for r in res["rows"] if w0 <= r[1] <= w1 and r[0] != "desired_wait"]
        lat = [r[2] * 1000 for r in rows]
        ops = {n for n, _ in OPERATOR_MIX}
        by: dict[str, dict[str, float]] = {}
        for name in sorted({r[0] for r in res["rows"] if w0 <= r[1] <= w1}):
            xs = [r[2] * 1000 for r in res["rows"] if r[0] == name and w0 <= r[1] <= w1]
            by[name] = {"n": len(xs), "p50_ms": round(pct(xs, 50), 2), "p99_ms": round(pct(xs, 99), 2)}
        window = w1 - w0
        if "cpu1" not in steady:
            raise RuntimeError("the load process did not run its steady phase")
        cpu, quiet = steady["cpu1"] - steady["cpu0"], steady["t1"] - steady["t0"]
        return {
            "window_s": window, "requests": len(rows),
            "api_p50_ms": pct(lat, 50), "api_p95_ms": pct(lat, 95), "api_p99_ms": pct(lat, 99),
            "operator_p99_ms": pct([r[2] * 1000 for r in rows if r[0] in ops], 99),
            "agent_p99_ms": pct([r[2] * 1000 for r in rows if r[0] not in ops], 99),
            "api_requests_per_s": len(rows) / window,
            "by_endpoint": by,
            "cycles_made_per_s": res["cycles_made_in_window"] / window,
            "cycles_applied_per_s": (mid["applied"] - before["applied"]) / (t_mid - t_before),
            # over the steady phase (the agents alone, no operator reads)
            "server_cpu_fraction": cpu / quiet,
            "server_cpu_ms_per_100_items_per_min": cpu / quiet * 60 * 1000 / (self.n_items / 100),
            "steady_cycles_made_per_s": json.loads((work / "steady.done").read_text())["made"] / quiet,
            "cycles_made": res["cycles_made"], "reports_pending": res["reports_pending"],
            "http_errors": sum(1 for r in rows if r[3] >= 400),
            "drained": res["drained"],
            "items_listed_per_page": res["items_listed"],
        }

    def burst(self, scheduler: Any) -> dict[str, Any]:
        """`--burst-items` items (default 500, the scheduler's dispatch batch) due at once; ticks
        until all their cycles are applied, or for --burst-seconds at most (the doubles answer
        as they do in the repetitions, and then finish what was dispatched)."""
        from sqlalchemy import select, update

        from standby.store.models import ProtectedItem

        before = self.counters()
        n = min(self.n_items, self.a.burst_items)
        with self.store.transaction() as s:
            ids = list(s.scalars(select(ProtectedItem.id).order_by(ProtectedItem.id).limit(n)))
            s.execute(update(ProtectedItem).where(ProtectedItem.id.in_(ids))
                      .values(next_cycle_at=datetime.now(UTC) - timedelta(seconds=1)))
        work = self.workdir / "burst"
        load = self.start_load(work, warmup_s=0.0, requests=0, clients=1, min_window_s=0.0, seed=self.a.seed,
                               drain_timeout_s=600.0)
        t0 = time.perf_counter()
        done = False
        applied = 0
        tick_cpu: list[float] = []
        dispatched: list[int] = []
        try:
            deadline = time.monotonic() + self.a.burst_seconds
            while time.monotonic() < deadline:
                if load.poll() is not None:
                    raise RuntimeError(f"the load process exited ({load.returncode})")
                tick0 = time.monotonic()
                c0 = time.thread_time()
                report = scheduler.tick()
                tick_cpu.append(time.thread_time() - c0)
                dispatched.append(report.cycles_dispatched)
                applied = self.counters()["applied"] - before["applied"]
                if applied >= n:
                    done = True
                    break
                time.sleep(max(0.0, self.a.tick_seconds - (time.monotonic() - tick0)))
            secs = time.perf_counter() - t0
            (work / "drain").write_text("")
            load.wait(660)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        res = json.loads((work / "load.json").read_text())
        if res["errors"]:
            raise RuntimeError("the load process failed in the burst:\n" + "\n".join(res["errors"][:3]))
        busy = [c for c, n in zip(tick_cpu, dispatched, strict=True) if n > 0]
        return {"cycle_burst_s": round(secs, 2), "cycle_burst_per_s": round(applied / secs, 1),
                "cycle_burst_items": n, "cycle_burst_applied": applied,
                # a tick that dispatches (up to the scheduler's batch per tick), per cycle dispatched
                "cycle_burst_tick_cpu_ms": round(med(busy) * 1000, 1) if busy else None,
                "dispatch_cpu_ms_per_cycle": round(sum(busy) * 1000 / max(1, sum(dispatched)), 3),
                "cycle_burst_complete": done, "cycle_burst_drained": res["drained"],
                "cycle_burst_http_errors": sum(1 for r in res["rows"] if r[3] >= 400)}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.cp.stop()


def _task_model() -> Any:
    from standby.store.models import AgentTask

    return AgentTask


def _make_scheduler(run: BackendRun) -> Any:
    from standby.orchestration.scheduler import Scheduler

    return Scheduler(run.store, run.cp.settings(tick_seconds=run.a.tick_seconds))


def run_backend(args: argparse.Namespace, backend: str, root: Path, pg: Any) -> dict[str, Any]:
    workdir = root / backend
    workdir.mkdir()
    db_url = None
    if backend == "postgresql":
        db_url = pg.create_database(f"standby_bench_{uuid.uuid4().hex[:8]}")
    run = BackendRun(args, backend, workdir, db_url)
    try:
        out: dict[str, Any] = run.populate()
        out.update(run.probe_item_list())
        out["operator_mix"] = {n: w for n, w in OPERATOR_MIX if n in run.mix}
        if args.contract == "desired":
            return _run_desired(args, run, out)
        scheduler = _make_scheduler(run)
        reps = []
        for rep in range(args.reps):
            r = run.repetition(rep, scheduler)
            reps.append(r)
            log(f"{backend} rep {rep + 1}: {r['requests']} requests in {r['window_s']:.1f} s, "
                f"p50/p95/p99 {r['api_p50_ms']:.1f}/{r['api_p95_ms']:.1f}/{r['api_p99_ms']:.1f} ms; "
                f"tick {r['scheduler_tick_cpu_ms']:.1f} ms CPU / {r['scheduler_tick_wall_ms']:.1f} ms wall; "
                f"cycles {r['cycles_dispatched_per_s']:.1f} dispatched, {r['cycles_applied_per_s']:.1f} applied /s")
        for k in ("api_p50_ms", "api_p95_ms", "api_p99_ms", "operator_p99_ms", "agent_p99_ms", "api_requests_per_s",
                  "scheduler_tick_cpu_ms", "scheduler_tick_wall_ms", "scheduler_cpu_fraction",
                  "cycles_dispatched_per_s", "cycles_applied_per_s"):
            out[k] = round(med([r[k] for r in reps]), 3)
        out["scheduler_cpu_ms_per_100_items"] = round(out["scheduler_tick_cpu_ms"] / (run.n_items / 100), 3)
        out["scheduler_ticks_per_s_capacity"] = round(1000 / out["scheduler_tick_wall_ms"], 1) \
            if out["scheduler_tick_wall_ms"] > 0 else None
        out["cycles_due_per_s"] = round(run.n_items / args.copy_frequency, 2) if args.copy_frequency else None
        out["by_endpoint"] = reps[len(reps) // 2]["by_endpoint"]
        out["http_errors"] = sum(r["http_errors"] for r in reps)
        out["items_listed_per_page"] = reps[-1]["items_listed_per_page"]
        if not args.no_burst:
            out.update(run.burst(scheduler))
            log(f"{backend} burst: {out['cycle_burst_applied']} of {out['cycle_burst_items']} cycles applied in "
                f"{out['cycle_burst_s']} s ({out['cycle_burst_per_s']}/s; a dispatching tick "
                f"{out['cycle_burst_tick_cpu_ms']} ms CPU)")
        final = run.counters()
        out["cycles_dispatched"] = final["dispatched"]
        out["cycles_applied"] = final["applied"]
        out["cycle_tasks_by_state"] = {k[len("tasks_"):]: v for k, v in final.items() if k.startswith("tasks_")}
        # At the end (the scheduler stopped, the doubles done): every cycle task succeeded and
        # its bytes reached its item. A repetition whose drain outlasted drain_timeout_s left
        # the rest to the next phase (reps_drained says which).
        out["all_cycles_applied"] = final["applied"] == final["dispatched"] == final.get("tasks_succeeded", 0)
        out["reps_drained"] = [r["drained"] for r in reps]
        out["items"] = run.n_items
        out["runs"] = reps
        return out
    finally:
        run.close()
        if db_url is not None:
            try:
                pg.drop_database(db_url.split("/")[-1].split("?")[0])
            except Exception as e:  # noqa: BLE001
                log(f"could not drop the bench database: {e}")


def _run_desired(args: argparse.Namespace, run: BackendRun, out: dict[str, Any]) -> dict[str, Any]:
    backend = run.backend
    reps = []
    for rep in range(args.reps):
        r = run.repetition_desired(rep)
        reps.append(r)
        log(f"{backend} rep {rep + 1}: {r['requests']} requests in {r['window_s']:.1f} s, "
            f"p50/p95/p99 {r['api_p50_ms']:.1f}/{r['api_p95_ms']:.1f}/{r['api_p99_ms']:.1f} ms "
            f"(operators {r['operator_p99_ms']:.1f}, agents {r['agent_p99_ms']:.1f}); cycles "
            f"{r['cycles_made_per_s']:.1f} made, {r['cycles_applied_per_s']:.1f} applied /s; control plane CPU "
            f"{r['server_cpu_ms_per_100_items_per_min']:.1f} ms per 100 items per minute")
    for k in ("api_p50_ms", "api_p95_ms", "api_p99_ms", "operator_p99_ms", "agent_p99_ms", "api_requests_per_s",
              "cycles_made_per_s", "cycles_applied_per_s", "server_cpu_fraction",
              "server_cpu_ms_per_100_items_per_min"):
        out[k] = round(med([r[k] for r in reps]), 3)
    out["cycles_due_per_s"] = round(run.n_items / args.copy_frequency, 2)
    out["by_endpoint"] = reps[len(reps) // 2]["by_endpoint"]
    out["http_errors"] = sum(r["http_errors"] for r in reps)
    final = run.counters()
    made = sum(r["cycles_made"] for r in reps)
    out["cycles_made"] = made
    out["cycles_applied"] = final["applied"]
    out["cycle_tasks"] = final["dispatched"]  # none: the doubles own their cycles
    # every cycle a double made was reported and applied once (bytes add up), none left behind
    out["all_cycles_applied"] = final["applied"] == made and all(r["reports_pending"] == 0 for r in reps)
    out["reps_drained"] = [r["drained"] for r in reps]
    out["items"] = run.n_items
    out["runs"] = reps
    return out


FIGURES = [
    ("api_p50_ms", "API latency p50 (ms)"), ("api_p95_ms", "API latency p95 (ms)"),
    ("api_p99_ms", "API latency p99 (ms)"), ("operator_p99_ms", "  operator reads p99 (ms)"),
    ("agent_p99_ms", "  agent calls p99 (ms)"), ("api_requests_per_s", "requests/s in the window"),
    ("scheduler_tick_cpu_ms", "scheduler tick CPU (ms)"), ("scheduler_tick_wall_ms", "scheduler tick wall (ms)"),
    ("scheduler_cpu_ms_per_100_items", "scheduler CPU per tick per 100 items (ms)"),
    ("scheduler_ticks_per_s_capacity", "scheduler ticks/s capacity"),
    ("cycles_due_per_s", "cycles due/s (items / copy frequency)"),
    ("cycles_dispatched_per_s", "cycles dispatched/s"), ("cycles_made_per_s", "cycles made by agents/s"),
    ("cycles_applied_per_s", "cycles applied/s"),
    ("server_cpu_ms_per_100_items_per_min", "control plane CPU per 100 items per min (ms)"),
    ("cycle_burst_per_s", "burst: cycles applied/s, all items due"), ("cycle_burst_s", "burst: seconds"),
    ("dispatch_cpu_ms_per_cycle", "burst: tick CPU per cycle dispatched (ms)"),
    ("all_cycles_applied", "every dispatched cycle applied"),
    ("items_list_probe_ms", "GET /items, every item (ms)"),
    ("inventory_put_full_cloud_ms", "PUT /agent/inventory into a full cloud (ms)"),
    ("inventory_round_s", "one inventory round of every primary (s)"),
    ("populate_s", "populate (s)"),
]


def _fmt(o: dict[str, Any]) -> str:
    backends = [b for b in ("sqlite", "postgresql") if b in o]
    lines = [f"{'':44}" + "".join(f"{b:>14}" for b in backends)]
    for k, label in FIGURES:
        cells = []
        for b in backends:
            v = o[b].get(k)
            cells.append(f"{v:>14.2f}" if isinstance(v, float) else f"{v!s:>14}")
        lines.append(f"{label:44}" + "".join(cells))
    for b in ("sqlite", "postgresql"):
        if f"{b}_error" in o:
            lines.append(f"{b}_error: {o[b + '_error']}")
    p = o["params"]
    lines.append(f"{o['items']} items, {o['agents']} agent doubles; medians of {p['reps']} repetitions of "
                 f"{p['requests']} operator requests from {p['clients']} clients; items created via "
                 f"{o['items_created_via']}")
    return "\n".join(lines)


def server_main(data_dir: str, tick_seconds: float, workers: int) -> None:
    """The control plane under test: `serve(load_settings(D))` (`workers` processes)."""
    import logging

    from standby.api.server import load_settings, serve

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(load_settings(data_dir, tick_seconds=tick_seconds), log_level="warning", workers=workers)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_load":
        load_main(sys.argv[2])
        return
    if len(sys.argv) > 4 and sys.argv[1] == "_server":
        server_main(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object of named figures")
    ap.add_argument("--items", type=int, default=5000, help="protected items")
    ap.add_argument("--vms-per-host", type=int, default=VMS_PER_HOST,
                    help="VMs per primary host (one agent double per host, as many secondary hosts)")
    ap.add_argument("--hosts-per-cloud", type=int, default=HOSTS_PER_CLOUD,
                    help="hosts per cloud (each primary cloud paired with a secondary cloud of as many hosts)")
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="1 repetition of 300 requests, a 1 s warm-up")
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--requests", type=int, default=0, help="operator requests per repetition (default 2000)")
    ap.add_argument("--clients", type=int, default=8, help="operator client threads")
    ap.add_argument("--operator-rate", type=float, default=OPERATOR_RATE,
                    help="operator requests per second over all clients, Poisson arrivals timed from when each "
                         "was due (0: each client sends back to back, a saturation test)")
    ap.add_argument("--double-threads", type=int, default=10, help="threads driving the agent doubles")
    ap.add_argument("--poll-seconds", type=float, default=1.0,
                    help="how often each double claims tasks (the real agent: about every second)")
    ap.add_argument("--inventory-seconds", type=float, default=0.0,
                    help="how often each double reports its inventory again during the run (the real agent: "
                         "60 s; default 0: only at population, see inventory_round_s)")
    ap.add_argument("--contract", choices=["desired", "tasks"], default="desired",
                    help="desired: the doubles own their cycles (desired state down, reports up; the real agent's "
                         "way); tasks: every cycle a task the scheduler dispatches (agents that do not own cycles)")
    ap.add_argument("--workers", type=int, default=1, help="API worker processes (PostgreSQL only)")
    ap.add_argument("--copy-frequency", type=int, default=0, choices=[0, 30, 300, 900],
                    help="the policy's copy frequency (default: 30 s under --contract desired, 300 s under tasks)")
    ap.add_argument("--tick-seconds", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds of doubles only before each window")
    ap.add_argument("--steady", type=float, default=0.0,
                    help="seconds of agents alone before each window, over which the control plane's CPU is "
                         "read (--contract desired; default 20, --quick 8)")
    ap.add_argument("--min-window", type=float, default=0.0,
                    help="the operators go on until this many seconds passed too (default 10, --quick 4)")
    ap.add_argument("--no-burst", action="store_true", help="skip the all-items-due burst")
    ap.add_argument("--burst-items", type=int, default=500, help="items made due at once in the burst")
    ap.add_argument("--burst-seconds", type=float, default=120.0,
                    help="the burst's length at most (it ends earlier once every item's cycle is applied)")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    args.reps = args.reps or (1 if args.quick else 3)
    if not args.requests:  # closed loop: a count; open loop: a minute of the rate (10 s with --quick)
        args.requests = (round(args.operator_rate * (10 if args.quick else 60)) if args.operator_rate > 0
                         else 300 if args.quick else 2000)
    args.warmup = args.warmup or (1.0 if args.quick else 3.0)
    args.min_window = args.min_window or (4.0 if args.quick else 10.0)
    args.steady = args.steady or (8.0 if args.quick else 20.0)
    args.copy_frequency = args.copy_frequency or (30 if args.contract == "desired" else 300)
    if args.workers > 1 and args.backend != "postgresql":
        ap.error("--workers needs --backend postgresql (SQLite is served by one process)")

    def on_signal(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one interrupt: the cleanup must not be cut short
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    root = Path(tempfile.mkdtemp(prefix="standby-bench-cp-", dir=args.dir))
    hosts = max(1, -(-args.items // args.vms_per_host))
    out: dict[str, Any] = {
        "items": args.items, "hosts": 2 * hosts, "agents": 2 * hosts,
        "items_created_via": "store.repo.items.create in bulk (POST /items runs readiness and a protect job per VM)",
        "params": {"reps": args.reps, "requests": args.requests, "clients": args.clients,
                   "operator_rate": args.operator_rate,
                   "double_threads": args.double_threads, "poll_seconds": args.poll_seconds,
                   "inventory_seconds": args.inventory_seconds, "claim_max": CLAIM_MAX,
                   "copy_frequency_seconds": args.copy_frequency, "tick_seconds": args.tick_seconds,
                   "contract": args.contract, "workers": args.workers,
                   "warmup_s": args.warmup, "vms_per_host": args.vms_per_host,
                   "hosts_per_cloud": args.hosts_per_cloud, "operator_mix": dict(OPERATOR_MIX),
                   "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
    }
    cluster = None
    try:
        pg = None
        if "postgresql" in backends:
            from standby.testing import postgres

            external = os.environ.get("STANDBY_TEST_PG_URL")
            why = None if external else postgres.reason_unavailable()
            if why:
                out["postgresql_error"] = why
                backends.remove("postgresql")
            elif external:
                pg = postgres.server_from_url(external)
            else:
                cluster = postgres.PgCluster(postgres.find_pg_bindir())  # type: ignore[arg-type]
                pg = cluster.start()
        for b in backends:
            log(f"{b}: {args.items} items")
            try:
                out[b] = run_backend(args, b, root, pg)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - reported, the other backend still runs
                traceback.print_exc()
                out[f"{b}_error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    out["params"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(_fmt(out))


if __name__ == "__main__":
    main()
