"""`standby agent run`: one agent process, from its data directory.

Threads:

- the replication receiver (`Receiver`: an accept thread and one thread per connection)
  on the configured listen address, over the replica store `A/replicas`, with a server
  TLS context from `agent.crt`/`agent.key` trusting `ca.crt` (the control plane's CA:
  every registered agent's certificate is signed by it, so peers authenticate each other);
- `heartbeat`: POST /agent/heartbeat every `heartbeat_seconds` (the interval the control
  plane answers with) with the version, the replica store's free and total bytes, and
  facts (host, listen address, running tasks, receiver counters);
- `inventory`: PUT /agent/inventory at start, every `inventory_seconds` and after a task
  that found a VM gone: the libvirt host as discovered, narrowed to the owned domains,
  entries the control plane acknowledged as digests only (`inventory.Digests`);
- `tasks`: POST /agent/tasks/claim about every second while a worker is free, hands the
  tasks to `workers` worker threads (2), which run them (`tasks.execute`), POST progress
  at most every `progress_seconds` and POST the result.

The control plane may go away (restart, network): a connection failure or a 5xx answer
is logged once per outage ("unreachable", then "reachable again after N s") and every
loop retries with a backoff of 1, 2, 4 ... 30 s, except the heartbeat, which keeps to
its own interval (it is the probe). The first loop to get an answer again wakes the
others, so a restarted control plane hears every agent's heartbeat at once. Replication (the receiver, running
cycles) goes on meanwhile; a result that could not be posted is kept and posted when the
control plane is back.

Claims: the control plane hands back, first, the tasks this agent claimed and has not
finished (so a restarted agent runs them again), then queued ones, up to `max`. The agent
asks for as many as it has unfinished (running, or result not yet posted) plus its free
workers, and skips those it already has.

SIGTERM/SIGINT (`stop`): no more claims, the receiver stops, the loops end, and running
tasks get `stop_grace` seconds to finish; a task still running then is left unfinished
(its thread is a daemon) and is handed to this agent again after its restart.
"""

from __future__ import annotations

import os
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from standby import __version__
from standby.agent import inventory as inv
from standby.agent.config import AgentConfig
from standby.agent.tasks import Outcome, TaskEnv, TaskProgress, execute
from standby.errors import NotFound, RemoteError, StandbyError

log = logging.getLogger("standby.agent")

MAX_BACKOFF = 30.0
# Tasks after which the inventory is sent at once (the control plane sees VMs through it).
VM_CHANGING_KINDS = frozenset({"define_vm", "start_vm", "stop_vm", "undefine_vm"})
# Lists of the inventory's answer not worth a log line (resend is logged when asked for).
QUIET_SYNC_KEYS = frozenset({"hosts_updated", "vms_updated", "resend", "hosts_resend"})


def abort_stale_backups(driver: Any, owns: Callable[[str], bool]) -> list[str]:
    """End the backup jobs an earlier agent process left on its running VMs (killed
    mid-cycle: libvirt keeps a pull-mode backup job until someone aborts it, and every
    later cycle of that VM then fails to get the domain's job lock). Only this agent starts
    backup jobs on the domains it owns, and it holds its data dir's lock, so at its first
    use of libvirt any such job is stale. Returns the VMs whose job was aborted."""
    conn = getattr(driver, "conn", None)
    if conn is None:
        return []
    import libvirt

    aborted = []
    try:
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError as exc:
        log.warning("cannot list domains to look for stale backup jobs: %s", exc.get_error_message())
        return []
    for dom in domains:
        try:
            if not owns(dom.name()) or dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                continue
            dom.backupGetXMLDesc(0)  # raises when the job is not a backup (a migration, a dump)
            dom.abortJob()
        except libvirt.libvirtError:
            continue
        log.warning("VM %s: aborted a backup job left by an earlier agent process (killed mid-cycle)", dom.name())
        aborted.append(dom.name())
    return aborted


PROBE_SECONDS = 60.0  # how often an agent with several control planes asks which is active
FENCE_SHUTDOWN_SECONDS = 30.0  # a fenced VM's graceful shutdown, then power off
REPORT_BATCH_LOG = 20  # a batch of this many reports (a catch-up after an outage) is logged


class ControlPlaneDown(RemoteError):
    """The control plane did not answer, or answered with a server error (5xx)."""


def _is_outage(exc: StandbyError) -> bool:
    status = getattr(exc, "http_status_received", None)
    if status is None:
        return isinstance(exc, RemoteError)  # no HTTP answer at all: refused, reset, timeout
    return int(status) >= 500


class ControlPlane:
    """The agent's side of the agent API: the shared ApiClient (client certificate), one
    per thread and control plane, and the outage bookkeeping that keeps the log to one
    line per outage.

    With several control planes (`AgentConfig.urls`: the active one and the standby of
    the other site), a call that finds its control plane down or passive (a 5xx: a
    passive control plane answers 503) moves the agent to the next one for the next call;
    the one that answers is kept. So the agent follows a promotion with nothing to change."""

    EPOCH_FILE = "control-plane-epoch"

    def __init__(self, cfg: AgentConfig, timeout: float = 30.0,
                 client_factory: Callable[[], Any] | None = None) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.urls = list(cfg.urls)
        self.epoch = self._load_epoch()  # the highest control-plane epoch this agent has seen
        self._current = 0  # index into urls: the control plane calls go to
        self._factory = client_factory  # tests: one client, whatever the URL
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Any] = []
        self.down_since: float | None = None
        self.outages = 0
        self.answered_by: str | None = None  # the control plane that answered last
        self.back = threading.Event()  # set when an outage ends (the agent's loops wake at once)

    @property
    def url(self) -> str:
        return self.urls[self._current]

    # ------------------------------------------------------------------ epochs

    def _load_epoch(self) -> int:
        try:
            return int((self.cfg.data_dir / self.EPOCH_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _save_epoch(self, epoch: int) -> None:
        path = self.cfg.data_dir / self.EPOCH_FILE
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(f"{epoch}\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot record control-plane epoch %d: %s", epoch, exc)

    def check_epoch(self, epoch: Any, url: str | None = None) -> None:
        """A control plane answered with `epoch`: a higher one is remembered; a lower one
        means a control plane replaced by a promotion (the old site's, back and unaware):
        it is not followed (ControlPlaneDown, and the next call tries the next one)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return  # a control plane that does not say (an older version): nothing to compare
        url = url or self.url
        with self._lock:
            known = self.epoch
            if epoch > known:
                self.epoch = epoch
        if epoch > known:
            self._save_epoch(epoch)
            if known:
                log.warning("control plane %s is at epoch %d (was %d): a standby was promoted; following it",
                            url, epoch, known)
            return
        if epoch < known:
            with self._lock:
                if len(self.urls) > 1 and self.urls[self._current] == url:
                    self._current = (self._current + 1) % len(self.urls)
            log.warning("control plane %s is stale (epoch %d, this agent has seen %d): not followed", url, epoch,
                        known)
            raise ControlPlaneDown(f"control plane {url} is stale (epoch {epoch} < {known})")

    def probe(self) -> None:
        """Ask every control plane's /health and go to the active one of the highest epoch
        (at start, and now and then: a promotion may have happened while this agent was down)."""
        if len(self.urls) < 2:
            return
        best: tuple[int, int] | None = None
        for i, url in enumerate(self.urls):
            try:
                h = self.client(url).request("GET", "/health")
            except StandbyError:
                continue
            if not isinstance(h, dict) or h.get("role", "active") != "active":
                continue
            ep = h.get("epoch") if isinstance(h.get("epoch"), int) else 0
            if best is None or ep > best[0]:
                best = (ep, i)
        if best is None:
            return
        if best[0] < self.epoch:
            log.warning("every active control plane is at an epoch below %d: not following any", self.epoch)
            return
        with self._lock:
            before, self._current = self._current, best[1]
        if before != best[1]:
            log.info("following control plane %s (active, epoch %d)", self.urls[best[1]], best[0])
        if best[0]:
            self.check_epoch(best[0], self.urls[best[1]])

    def _client(self, url: str) -> Any:
        if self._factory is not None:
            return self._factory()
        from standby.client import ApiClient

        return ApiClient(url, ca=self.cfg.ca_path, cert=(self.cfg.cert_path, self.cfg.key_path),
                         timeout=self.timeout)

    def client(self, url: str | None = None) -> Any:
        url = url or self.url
        mine = getattr(self._local, "clients", None)
        if mine is None:
            mine = self._local.clients = {}
        c = mine.get(url)
        if c is None:
            c = mine[url] = self._client(url)
            with self._lock:
                self._clients.append(c)
        return c

    def interrupt(self) -> None:
        """End the long-polls in flight now, and refuse new ones (the agent is stopping)."""
        with self._lock:
            self._interrupted = True
            polls, self._polls = getattr(self, "_polls", {}), {}
        for c in polls.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing; nothing to do about it
                pass

    def _poll_client(self, url: str) -> Any:
        with self._lock:
            polls = self.__dict__.setdefault("_polls", {})
            c = polls.get(url)
            if c is None:
                c = polls[url] = self._client(url)
            return c

    def call(self, method: str, path: str, body: Any = None, *, long_poll: bool = False) -> Any:
        """One request; ControlPlaneDown on an outage (logged once), the StandbyError of
        the answer otherwise (a 4xx: the control plane said no). `long_poll`: on a client
        of its own, which `interrupt` closes (a stopping agent does not wait for it)."""
        url = self.url
        if long_poll and getattr(self, "_interrupted", False):
            raise ControlPlaneDown("the agent is stopping")
        try:
            client = self._poll_client(url) if long_poll else self.client(url)
            try:
                out = client.request(method, path, json=body)
            except Exception:
                if long_poll and getattr(self, "_interrupted", False):
                    raise ControlPlaneDown("the agent is stopping") from None  # its client closed under it
                raise
        except StandbyError as exc:
            if not _is_outage(exc):
                self._answered(url)  # a refusal is an answer: the control plane is there
                raise
            with self._lock:
                first = self.down_since is None
                if first:
                    self.down_since = time.monotonic()
                    self.outages += 1
                if len(self.urls) > 1 and self.urls[self._current] == url:
                    self._current = (self._current + 1) % len(self.urls)  # the next call tries the next one
            if first:
                others = f"; trying {', '.join(u for u in self.urls if u != url)} too" if len(self.urls) > 1 else ""
                log.warning("control plane unreachable: %s (%s)%s; retrying with backoff, replication goes on",
                            url, exc.message, others)
            raise ControlPlaneDown(exc.message) from None
        self._answered(url)
        return out

    def _answered(self, url: str) -> None:
        with self._lock:
            since, self.down_since = self.down_since, None
            before, self.answered_by = self.answered_by, url
        if since is not None:
            moved = f" at {url} (was {before})" if before and before != url else ""
            log.info("control plane reachable again after %.0f s%s", time.monotonic() - since, moved)
            self.back.set()
        elif before is not None and before != url:
            log.info("control plane is now %s (was %s)", url, before)

    def close(self) -> None:
        self.interrupt()
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing; nothing to do about it
                pass


@dataclass
class RunningTask:
    task: dict[str, Any]
    progress: TaskProgress = field(default_factory=TaskProgress)
    outcome: Outcome | None = None
    started: float = field(default_factory=time.monotonic)
    posting: threading.Lock = field(default_factory=threading.Lock)  # one result post at a time

    @property
    def id(self) -> int:
        return int(self.task["id"])


class AgentRuntime:
    def __init__(self, cfg: AgentConfig, *, workers: int = 2, claim_seconds: float = 1.0,
                 inventory_seconds: float = 60.0, progress_seconds: float = 1.0, stop_grace: float = 30.0,
                 driver_factory: Callable[[], Any] | None = None, control_plane: ControlPlane | None = None) -> None:
        self.cfg = cfg
        self.workers = workers
        self.claim_seconds = claim_seconds
        self.inventory_seconds = inventory_seconds
        self.progress_seconds = progress_seconds
        self.stop_grace = stop_grace
        self.heartbeat_seconds = cfg.heartbeat_seconds
        self.cp = control_plane or ControlPlane(cfg)
        self._driver_factory = driver_factory or self._libvirt_driver
        self._driver: Any = None
        self._driver_lock = threading.Lock()
        self._swept = False
        self._lock_fd: int | None = None
        self._refusals: dict[str, str] = {}  # loop -> the refusal it last logged
        self._closed = False  # stop() closed the control-plane clients
        self._stop = threading.Event()
        self._inventory_now = threading.Event()
        self._heartbeat_now = threading.Event()
        self._claim_now = threading.Event()
        self._fence_now = threading.Event()
        self._desired_now = threading.Event()
        self.cycles: Any = None  # agent.cycles.CycleScheduler, once started
        self.spool: Any = None  # agent.cycles.ReportSpool
        self._fence_list: list[str] = []  # this host's VMs that failed over (the control plane says)
        self._fenced: set[str] = set()  # ... and were found off with autostart off
        self._queue: queue.Queue[RunningTask | None] = queue.Queue()
        self._lock = threading.Lock()
        self._tasks: dict[int, RunningTask] = {}  # claimed here, result not yet accepted
        self._threads: list[threading.Thread] = []
        self._workers: list[threading.Thread] = []
        self.clock_skew: float | None = None
        self.receiver: Any = None
        self.store: Any = None
        self.env: TaskEnv | None = None
        self.stats = {"heartbeats": 0, "inventories": 0, "claimed": 0, "succeeded": 0, "failed": 0}
        self.inventory_digests = inv.Digests()  # what the control plane acknowledged (memory only)

    # ------------------------------------------------------------------ parts

    def _libvirt_driver(self) -> Any:
        from standby.drivers.libvirt.driver import LibvirtDriver

        return LibvirtDriver(self.cfg.libvirt_uri, self.cfg.tracking_dir)

    def driver(self) -> Any:
        """The libvirt driver, opened on first use and reopened when its connection died
        (libvirtd restarted)."""
        with self._driver_lock:
            d = self._driver
            if d is not None:
                conn = getattr(d, "_conn", None)
                try:
                    alive = conn is None or bool(conn.isAlive())
                except Exception:  # noqa: BLE001 - a dead connection may raise anything
                    alive = False
                if not alive:
                    log.info("libvirt connection to %s lost; reconnecting", self.cfg.libvirt_uri)
                    d.close()
                    self._driver = d = None
            if d is None:
                d = self._driver = self._driver_factory()
                if not self._swept:
                    self._swept = True
                    abort_stale_backups(d, self.cfg.owns)
            return d

    def start(self) -> AgentRuntime:
        from standby.replication.receiver import Receiver
        from standby.replication.store import ReplicaStore
        from standby.replication.tls import Identity, client_context, server_context

        cfg = self.cfg
        self._take_lock()
        try:
            ident = Identity(cfg.cert_path, cfg.key_path, cfg.ca_path)
            server_ctx = server_context(ident)
            client_ctx = client_context(ident)
            cfg.replicas_dir.mkdir(parents=True, exist_ok=True)
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self.store = ReplicaStore(cfg.replicas_dir)
            try:
                self.receiver = Receiver(self.store, server_ctx, cfg.listen_host, cfg.listen_port)
            except OSError as exc:
                from standby.errors import BadInput

                raise BadInput(f"cannot listen on {cfg.listen}: {exc.strerror or exc}") from None
        except BaseException:
            self._release_lock()
            raise
        self.receiver.start()

        def ctx() -> ssl.SSLContext:
            return client_ctx

        from standby.agent.cycles import REPORTS_FILE, CycleScheduler, ReportSpool, load_desired
        from standby.replication.sender import RateLimiter

        self.env = TaskEnv(self.store, cfg.state_dir, self.driver, ctx, cfg.owns, limiter=RateLimiter(None))
        self.spool = ReportSpool(cfg.data_dir / REPORTS_FILE)
        self.cycles = CycleScheduler(self.env, cfg.state_dir, self.spool, workers=self.workers)
        last = load_desired(cfg.data_dir)
        if last is not None:
            log.info("replicating under the last desired state it saw (version %s, %d VM(s)) until the control "
                     "plane says otherwise", last.version, len(last.vms))
            self.cycles.update(last)
        for name, target in (("agent-heartbeat", self._heartbeat_loop), ("agent-inventory", self._inventory_loop),
                             ("agent-tasks", self._task_loop), ("agent-cp-watch", self._control_plane_watch),
                             ("agent-fence", self._fence_loop), ("agent-desired", self._desired_loop),
                             ("agent-cycles", lambda: self.cycles.run(self._stop)),
                             ("agent-reports", self._report_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(t)
        for i in range(self.workers):
            self._workers.append(threading.Thread(target=self._worker, name=f"agent-worker-{i}", daemon=True))
        for t in self._threads + self._workers:
            t.start()
        log.info("agent %s running: replication on %s:%d, replicas in %s, control plane %s", cfg.name,
                 self.receiver.address[0], self.receiver.address[1], cfg.replicas_dir, " or ".join(cfg.urls))
        return self

    def _take_lock(self) -> None:
        """One agent process per data dir: two would run the same tasks and the stale-job
        sweep of one would abort the other's cycles."""
        import fcntl
        import os

        from standby.errors import Conflict

        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cfg.data_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(f"another agent process runs on {self.cfg.data_dir}") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        import os

        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def stop(self) -> None:
        log.info("agent %s stopping", self.cfg.name)
        self._stop.set()
        for event in (self._inventory_now, self._heartbeat_now, self._claim_now, self._fence_now,
                      self._desired_now):
            event.set()
        self.cp.interrupt()
        if self.cycles is not None:
            self.cycles.wake.set()
            if not self.cycles.wait_idle(self.stop_grace):
                log.warning("stopping with cycles in flight (items %s): their points are whole or absent",
                            self.cycles.running())
        if self.spool is not None:
            self.spool.ready.set()
        if self.receiver is not None:
            self.receiver.stop()
        for t in self._threads:
            if t.name == "agent-desired":
                continue  # a long-poll in flight ends when the server answers; the thread then sees the stop
            t.join(timeout=self.cp.timeout + 5)
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + self.stop_grace
        for t in self._workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        left = [rt for rt in self.running() if rt.outcome is None]
        if left:
            log.warning("stopping with %d task(s) unfinished (%s): they are handed back after a restart",
                        len(left), ", ".join(f"{rt.id} {rt.task.get('kind')}" for rt in left))
        else:
            self._post_pending_results()  # last try for results the control plane has not taken yet
        self._closed = True
        self.cp.close()
        with self._driver_lock:
            if self._driver is not None and not left:  # a running task may still use it
                self._driver.close()
                self._driver = None
        self._release_lock()
        log.info("agent %s stopped", self.cfg.name)

    def __enter__(self) -> AgentRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> list[RunningTask]:
        with self._lock:
            return list(self._tasks.values())

    def sync_inventory_soon(self) -> None:
        self._inventory_now.set()

    # ------------------------------------------------------------------ loops

    def _wait_or_back(self, seconds: float, woken: threading.Event) -> bool:
        """Sleep `seconds`, or until the control plane is back from an outage (`woken`
        is this loop's copy of that news); True when stopping."""
        woken.wait(seconds)
        woken.clear()
        return self._stop.is_set()

    def _control_plane_watch(self) -> None:
        """When an outage ends (whichever loop saw it first), wake the heartbeat, claim
        and inventory loops at once: a restarted control plane hears from every agent
        within a second, not after each loop's backoff."""
        while not self._stop.is_set():
            if not self.cp.back.wait(0.5):
                continue
            self.cp.back.clear()
            for event in (self._heartbeat_now, self._claim_now, self._inventory_now, self._desired_now):
                event.set()
            if self.spool is not None:
                self.spool.ready.set()

    def _refused(self, what: str, message: str | None) -> None:
        """Log a refusal (revoked agent, libvirt down, a report the control plane rejects)
        when it starts or changes, not at every retry; and its end."""
        last = self._refusals.get(what)
        if message == last:
            return
        if message is None:
            self._refusals.pop(what, None)
            log.info("%s: works again", what)
        else:
            self._refusals[what] = message
            log.warning("%s failed: %s (retrying with backoff)", what, message)

    @staticmethod
    def _backoff(delay: float) -> float:
        return min(MAX_BACKOFF, max(1.0, delay * 2))

    def heartbeat(self) -> dict[str, Any]:
        free, total = inv.storage(self.cfg.replicas_dir)
        running = self.running()
        facts = {"host": self.cfg.host, "listen": self.cfg.listen, "libvirt_uri": self.cfg.libvirt_uri,
                 "domains": self.cfg.domains, "vm_prefix": self.cfg.vm_prefix, "owns_cycles": True,
                 "tasks_running": [rt.id for rt in running if rt.outcome is None],
                 "receiver": dict(self.receiver.stats) if self.receiver is not None else {}}
        t0 = time.time()
        answer = self.cp.call("POST", "/agent/heartbeat", {"version": __version__, "storage_free_bytes": free,
                                                           "storage_total_bytes": total, "facts": facts})
        t1 = time.time()
        self.stats["heartbeats"] += 1
        if isinstance(answer, dict):
            self.cp.check_epoch(answer.get("epoch"))
            fence = answer.get("fence")
            if isinstance(fence, list) and (fence or self._fence_list):
                self._fence_list = [str(v) for v in fence if isinstance(v, str)]
                self._fence_now.set()
            hb = answer.get("heartbeat_seconds")
            if isinstance(hb, (int, float)) and hb > 0 and hb != self.heartbeat_seconds:
                log.info("heartbeat every %g s (control plane)", hb)
                self.heartbeat_seconds = float(hb)
            server_time = answer.get("server_time")
            if isinstance(server_time, str):
                try:
                    st = datetime.fromisoformat(server_time.replace("Z", "+00:00"))
                    if st.tzinfo is None:
                        st = st.replace(tzinfo=timezone.utc)
                    self.clock_skew = (t0 + t1) / 2 - st.timestamp()
                except ValueError:
                    pass
        return answer if isinstance(answer, dict) else {}

    def fence(self, names: list[str]) -> None:
        """Keep this host's failed-over VMs off: one still running (its site came back after
        a disaster, the VM set to start with the host) is shut down, and autostart goes
        off; each is reported once (an alert on the control plane)."""
        from standby.drivers.base import VmState

        self._fenced &= set(names)
        for vm in names:
            if vm in self._fenced or not self.cfg.owns(vm):
                continue
            try:
                drv = self.driver()
                info = drv.vm(vm)
                running = info.state in (VmState.RUNNING, VmState.PAUSED, VmState.OTHER)
                autostart_was = drv.set_autostart(vm, False)
                if running:
                    log.warning("VM %s failed over to the secondary but runs here: shutting it down (fencing)", vm)
                    if drv.shutdown_vm(vm, FENCE_SHUTDOWN_SECONDS) is False:
                        log.warning("VM %s did not shut down within %g s: powered off", vm, FENCE_SHUTDOWN_SECONDS)
                elif autostart_was:
                    log.warning("VM %s failed over to the secondary: its autostart here is turned off", vm)
                self.cp.call("POST", "/agent/fenced", {"vm": vm, "was_running": running,
                                                       "autostart_was": autostart_was})
            except NotFound:
                self._fenced.add(vm)  # not on this host (any more): nothing can run
                continue
            except StandbyError as exc:
                self._refused(f"fencing {vm}", exc.message)
                continue
            self._refused(f"fencing {vm}", None)
            self._fenced.add(vm)

    def _fence_loop(self) -> None:
        while not self._stop.is_set():
            self._fence_now.wait(5.0)
            self._fence_now.clear()
            if self._stop.is_set():
                return
            try:
                self.fence(list(self._fence_list))
            except Exception:  # noqa: BLE001 - a bug must not stop the fencing loop
                log.exception("fencing failed")

    def report_break_glass(self) -> None:
        """Report break-glass failovers run on this host while no control plane answered
        (`agent/breakglass.py`); each is reported until a control plane takes it."""
        from standby.agent import breakglass

        for rec in breakglass.unreported(self.cfg):
            if rec.outcome != "done":
                continue  # a failed one is the operator's to run again (it goes on where it stopped)
            what = f"break-glass report of {rec.vm}"
            try:
                ans = self.cp.call("POST", "/agent/breakglass", rec.as_dict())
            except ControlPlaneDown:
                return
            except StandbyError as exc:
                self._refused(what, exc.message)
                continue
            self._refused(what, None)
            breakglass.mark_reported(self.cfg, rec)
            log.warning("break-glass failover of %s (replica %s, point %s) reported to %s: item %s is %s, job %s",
                        rec.vm, rec.replica_vm, rec.point.get("id"), self.cp.answered_by, ans.get("item_id"),
                        ans.get("state"), ans.get("job_id"))

    def _desired_loop(self) -> None:
        """Follow the desired state (long-polled); keep the last one while the control plane
        is away (see agent/cycles.py)."""
        from standby.agent.cycles import LONG_POLL_SECONDS, save_desired
        from standby.contract import DesiredState

        delay = 0.0
        away = False
        while not self._stop.is_set():
            have = self.cycles.state.version if self.cycles.state is not None else ""
            # a wait drawn from the last quarter of the long-poll: agents started together (a
            # control plane back from a restart) do not all come back in the same second
            wait = LONG_POLL_SECONDS * random.uniform(0.75, 1.0)
            try:
                answer = self.cp.call("GET", f"/agent/desired?have={have}&wait={wait:.1f}&if_changed=true",
                                      long_poll=True)
                state = DesiredState.model_validate(answer) if answer is not None else None  # None: unchanged
                if state is not None and state.version != have:
                    save_desired(self.cfg.data_dir, state)
                    self.cycles.update(state)
                    log.info("desired state %s: %d VM(s) to replicate, %d replica(s) to keep%s", state.version,
                             len(state.vms), len(state.replicas),
                             f", bandwidth {state.bandwidth}" if state.bandwidth else "")
                if away:
                    log.info("desired state followed again")
                away, delay = False, 0.0
                continue
            except ControlPlaneDown:
                if self._stop.is_set():
                    return
                if not away and self.cycles.state is not None:
                    log.warning("cut off from the control plane: replicating under the last desired state "
                                "(version %s, %d VM(s)); reports wait until it is back", self.cycles.state.version,
                                len(self.cycles.state.vms))
                away = True
                delay = self._backoff(delay)
            except StandbyError as exc:
                self._refused("desired state", exc.message)
                delay = self._backoff(delay)
            except Exception:  # noqa: BLE001 - a bug must not stop following the desired state
                log.exception("desired state failed")
                delay = self._backoff(delay)
            if self._wait_or_back(min(delay, self.heartbeat_seconds), self._desired_now):
                return

    def _report_loop(self) -> None:
        """Send the cycles' reports in batches (see agent/cycles.py)."""
        from standby.agent.cycles import REPORT_SECONDS, report_batch

        last_sent: tuple[Any, ...] | None = None
        last_at = 0.0
        delay = 0.0
        while not self._stop.is_set():
            self.spool.ready.wait(max(REPORT_SECONDS, delay))
            self.spool.ready.clear()
            if self._stop.is_set() and not len(self.spool):
                return
            batch = report_batch(self.spool, self.cycles)
            what = (batch.desired_version, tuple(batch.active), tuple(batch.running))
            if not batch.cycles and what == last_sent and time.monotonic() - last_at < 10 * REPORT_SECONDS:
                continue
            try:
                ans = self.cp.call("POST", "/agent/reports", batch.model_dump(mode="json"))
            except ControlPlaneDown:
                delay = min(self._backoff(delay), self.heartbeat_seconds)
                if self._stop.is_set():
                    return
                continue
            except StandbyError as exc:
                self._refused("reports", exc.message)
                delay = self._backoff(delay)
                continue
            self._refused("reports", None)
            delay = 0.0
            self.spool.taken(len(batch.cycles))
            last_sent, last_at = what, time.monotonic()
            if len(batch.cycles) >= REPORT_BATCH_LOG:
                log.info("%d cycle report(s) taken by the control plane (%s applied)", len(batch.cycles),
                         (ans or {}).get("applied"))
            if len(self.spool):
                self.spool.ready.set()  # more were waiting: the next batch at once
            if self._stop.is_set():
                return

    def _heartbeat_loop(self) -> None:
        delay = 0.0
        probed = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - probed >= PROBE_SECONDS:
                    probed = time.monotonic()
                    self.cp.probe()
                self.heartbeat()
                self.report_break_glass()
                self._refused("heartbeat", None)
                delay = 0.0
                wait = self.heartbeat_seconds
            except ControlPlaneDown:
                # the heartbeat is the agent's probe of the control plane: during an outage
                # it goes on at its own interval (no more often), so the agent is heard
                # from within one interval of the control plane's return
                delay = self._backoff(delay)
                wait = min(delay, self.heartbeat_seconds)
            except StandbyError as exc:
                self._refused("heartbeat", exc.message)
                delay = wait = self._backoff(delay)
            except Exception:  # noqa: BLE001 - a bug must not stop the heartbeats
                log.exception("heartbeat failed")
                delay = wait = self._backoff(delay)
            if self._wait_or_back(wait, self._heartbeat_now):
                return

    def sync_inventory(self) -> dict[str, Any]:
        return self.report_inventory(inv.collect(self.cfg, self.driver(), self.clock_skew))

    def report_inventory(self, full: dict[str, Any]) -> dict[str, Any]:
        """PUT the inventory `full`, entries the control plane acknowledged as digests only;
        what it answers it does not know (restored from a backup, another control plane)
        goes in full in a second PUT at once. The answers, lists joined."""
        answer = self._put_inventory(full)
        if answer.get("resend") or answer.get("hosts_resend"):
            log.info("inventory: the control plane asked again for %d VM(s)%s in full", len(answer.get("resend") or []),
                     " and the host" if answer.get("hosts_resend") else "")
            again = self._put_inventory(full)
            answer = {k: (v + again[k] if isinstance(v, list) and isinstance(again.get(k), list) else again.get(k, v))
                      for k, v in answer.items()}
        return answer

    def _put_inventory(self, full: dict[str, Any]) -> dict[str, Any]:
        body = self.inventory_digests.report(full)
        answer = self.cp.call("PUT", "/agent/inventory", body)
        self.stats["inventories"] += 1
        self.inventory_digests.acknowledge(body, answer)
        return answer if isinstance(answer, dict) else {}

    def _inventory_loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            self._inventory_now.clear()
            try:
                res = self.sync_inventory()
                changed = {k: v for k, v in res.items() if v and isinstance(v, list) and k not in QUIET_SYNC_KEYS}
                if changed:
                    log.info("inventory synced: %s", ", ".join(f"{k} {', '.join(map(str, v))}"
                                                                for k, v in changed.items()))
                self._refused("inventory", None)
                delay = 0.0
                wait = self.inventory_seconds
            except ControlPlaneDown:
                delay = wait = self._backoff(delay)
            except StandbyError as exc:  # libvirt down, or the control plane refused the report
                self._refused("inventory", exc.message)
                delay = wait = self._backoff(delay)
            except Exception:  # noqa: BLE001
                log.exception("inventory sync failed")
                delay = wait = self._backoff(delay)
            self._inventory_now.wait(wait)

    def claim(self) -> list[RunningTask]:
        """Claim new tasks for the free workers; returns those handed to them."""
        with self._lock:
            known = set(self._tasks)
            busy = sum(1 for rt in self._tasks.values() if rt.outcome is None)
        free = self.workers - busy
        if free <= 0:
            return []
        answer = self.cp.call("POST", "/agent/tasks/claim", {"max": len(known) + free})
        new = []
        for t in (answer or {}).get("tasks", []):
            if not isinstance(t, dict) or not isinstance(t.get("id"), int) or t["id"] in known:
                continue
            if len(new) >= free:
                break  # handed back to us at the next claim
            rt = RunningTask(t)
            with self._lock:
                self._tasks[rt.id] = rt
            new.append(rt)
            log.info("task %d %s claimed (attempt %s)", rt.id, t.get("kind"), t.get("attempt"))
            self._queue.put(rt)
        self.stats["claimed"] += len(new)
        return new

    def _task_loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            try:
                self._post_pending_results()
                self.claim()
                self._refused("claiming tasks", None)
                delay = 0.0
                wait = self.claim_seconds
            except ControlPlaneDown:
                delay = wait = self._backoff(delay)
            except StandbyError as exc:
                self._refused("claiming tasks", exc.message)
                delay = wait = self._backoff(delay)
            except Exception:  # noqa: BLE001
                log.exception("claiming tasks failed")
                delay = wait = self._backoff(delay)
            if self._wait_or_back(wait, self._claim_now):
                return

    def _post_pending_results(self) -> None:
        for rt in self.running():
            if rt.outcome is not None:
                self._post_result(rt)

    def _post_result(self, rt: RunningTask) -> bool:
        assert rt.outcome is not None
        if not rt.posting.acquire(blocking=False):
            return False  # the worker and the task loop both try: one is enough
        try:
            with self._lock:
                if rt.id not in self._tasks:
                    return True
            try:
                self.cp.call("POST", f"/agent/tasks/{rt.id}/result", rt.outcome.body())
            except ControlPlaneDown:
                return False  # kept; posted by the task loop once the control plane is back
            except NotFound:
                pass  # the task is gone (purged, or the agent re-registered): nothing to report to
            except StandbyError as exc:
                log.warning("result of task %d refused: %s", rt.id, exc.message)
            with self._lock:
                self._tasks.pop(rt.id, None)
            return True
        finally:
            rt.posting.release()

    def _post_progress(self, rt: RunningTask) -> None:
        try:
            answer = self.cp.call("POST", f"/agent/tasks/{rt.id}/progress", rt.progress.snapshot())
        except StandbyError:
            return  # progress is best effort; the result is what counts
        if isinstance(answer, dict) and answer.get("cancel_requested") and not rt.progress.cancel_requested:
            rt.progress.cancel_requested = True
            log.info("task %d: the control plane asked to cancel it", rt.id)

    def _run(self, rt: RunningTask) -> Outcome:
        """Run a task on this thread while a helper posts its progress."""
        assert self.env is not None
        done = threading.Event()

        def reporter() -> None:
            # A full interval after each post before the next: at most one a progress_seconds.
            while not done.wait(self.progress_seconds):
                if rt.progress.changed.is_set():
                    rt.progress.changed.clear()
                    self._post_progress(rt)

        rt.progress.set(0, "started")
        rt.progress.changed.clear()
        self._post_progress(rt)
        if rt.progress.cancel_requested:
            return Outcome(False, {}, "cancelled before it started", "Refused")
        t = threading.Thread(target=reporter, name=f"agent-progress-{rt.id}", daemon=True)
        t.start()
        try:
            return execute(self.env, rt.task, rt.progress)
        finally:
            done.set()
            t.join()

    def _worker(self) -> None:
        while True:
            rt = self._queue.get()
            if rt is None:
                return
            t0 = time.monotonic()
            outcome = self._run(rt)
            rt.outcome = outcome
            took = time.monotonic() - t0
            if outcome.ok:
                self.stats["succeeded"] += 1
                log.info("task %d %s done in %.1f s", rt.id, rt.task.get("kind"), took)
                if rt.task.get("kind") in VM_CHANGING_KINDS:
                    self.sync_inventory_soon()  # a VM came, went, started or stopped: report it now
            else:
                self.stats["failed"] += 1
                log.warning("task %d %s failed in %.1f s: %s: %s", rt.id, rt.task.get("kind"), took,
                            outcome.error_type, outcome.error)
                if outcome.error_type == NotFound.__name__ and rt.task.get("kind") in ("cycle", "seed_export"):
                    self.sync_inventory_soon()  # the VM may be gone: tell the control plane
            if self._stop.is_set() and self._closed:
                return  # finished after the stop's grace: the next start gets the task again
            try:
                self._post_result(rt)
            except Exception:  # noqa: BLE001 - the clients were closed under us by stop()
                log.debug("result of task %d not posted", rt.id, exc_info=True)
