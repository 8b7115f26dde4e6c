"""`standby server run --workers N`: N processes serving the API on one listener, on
PostgreSQL (SQLite stays one process: one writer at a time is all it has).

The supervisor (this process) migrates the store once, binds the listener, and forks the
workers before it has a thread or a database connection. Each worker is a whole control
plane process (`serve` on the inherited socket: the kernel spreads connections among them)
with the instance's id in its settings: one of them takes the active lock and leads (the
scheduler, job runner and webhooks, `orchestration/role.py`), the others serve the API,
and a change committed in any wakes the agents' long-polls in all (NOTIFY,
`orchestration/desired.py`). A worker that dies is started again (after 1 s, backing off
to 30 s while they die at once); if it was the leader, another worker leads within a
second or two meanwhile. SIGTERM or SIGINT stop the workers (each finishes its requests)
and then the supervisor. A worker whose supervisor dies gets SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import replace

from standby.errors import BadInput
from standby.orchestration.settings import ServerSettings

log = logging.getLogger("standby.server")

RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
QUICK_DEATH = 10.0  # a worker that dies sooner than this after its start backs the restarts off
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: an orphaned worker is stopped by hand
        pass


def serve_workers(settings: ServerSettings, workers: int, *, log_level: str | None = None) -> None:
    from standby.api.server import _bind, serve
    from standby.store import open_store

    if not settings.url.startswith("postgresql"):
        raise BadInput(f"--workers {workers}: several workers need PostgreSQL (--db postgresql+psycopg://...); "
                       "a SQLite store is served by one process")
    if workers > 64:
        raise BadInput(f"--workers {workers}: at most 64")
    open_store(settings.url, migrate="unless-standby").close()  # once, not raced by the workers
    sock = _bind(settings)
    settings = replace(settings, instance=uuid.uuid4().hex[:16])
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    delay = {slot: RESTART_DELAY for slot in range(workers)}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent()
                serve(settings, log_level=log_level, sock=sock)
            except BaseException:  # noqa: BLE001 - whatever it was, the supervisor starts another
                log.exception("worker %d (pid %d) failed", slot, os.getpid())
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
        children[pid] = (slot, time.monotonic())

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    log.info("control plane instance %s: %d workers on https://%s", settings.instance, workers, settings.listen)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for slot in range(workers):
            spawn(slot)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            slot, started = children.pop(pid, (None, 0.0))
            if slot is None or stopping:
                continue
            lived = time.monotonic() - started
            delay[slot] = RESTART_DELAY if lived >= QUICK_DEATH else min(delay[slot] * 2, RESTART_DELAY_MAX)
            log.warning("worker %d (pid %d) exited (%s) after %.0f s: starting another in %.0f s", slot, pid,
                        _describe(status), lived, delay[slot])
            end = time.monotonic() + delay[slot]
            while not stopping and time.monotonic() < end:
                time.sleep(0.1)
            if not stopping:
                spawn(slot)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    log.info("control plane instance %s stopped", settings.instance)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.waitstatus_to_exitcode(status)}"
