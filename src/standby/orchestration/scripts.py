"""Running a recovery plan's pre and post scripts.

    result = run_plan_script(script, plan="erp", group="db", failover_type="planned",
                             vms=["erp-db01"], scripts_dir=Path("/srv/standby/scripts"))

A script runs as a child of the control plane, in a session (and process group) of its
own, with stdin from /dev/null and stdout and stderr captured together. Only the last
`tail_bytes` (64 KiB) of its output are kept, however much it writes. Its environment
is the control plane's plus:

    STANDBY_PLAN           the plan's name
    STANDBY_GROUP          the group's name (or "group N")
    STANDBY_FAILOVER_TYPE  test | planned | unplanned
    STANDBY_VMS            the group's VMs, separated by spaces (VM names have none)

Exit 0 passes the step. A non-zero exit raises `ScriptFailed` with the exit code and the
output's tail in its message; a script still running at its timeout (default 600 s) has
its whole process group sent SIGTERM, then SIGKILL after `kill_grace` seconds, and raises
`ScriptTimedOut`; a script that cannot be started raises `ScriptNotRunnable`. Unlike the
reference, output on stderr does not fail a script (tools log there).

A script that exits leaving a background child holding its output open is not waited
for beyond `drain_seconds`: the child is left alone (a script may start a service), only
its output is no longer read.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from standby.domain.plans import DEFAULT_SCRIPT_TIMEOUT, Script
from standby.errors import RemoteError

__all__ = [
    "TAIL_BYTES",
    "ScriptFailed",
    "ScriptNotRunnable",
    "ScriptResult",
    "ScriptTimedOut",
    "run_plan_script",
    "run_script",
    "script_env",
]

TAIL_BYTES = 64 * 1024
MESSAGE_TAIL_CHARS = 4000   # of the tail, quoted in an error message (the API shows messages)
_READ = 64 * 1024


@dataclass(frozen=True)
class ScriptResult:
    path: str
    args: tuple[str, ...]
    returncode: int | None       # None: timed out; negative: killed by that signal
    seconds: float
    output: str                  # the last TAIL_BYTES of stdout + stderr, decoded (invalid UTF-8 replaced)
    output_bytes: int            # all it wrote
    timed_out: bool = False

    @property
    def truncated(self) -> bool:
        return self.output_bytes > len(self.output.encode("utf-8", "replace"))

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "args": list(self.args), "returncode": self.returncode,
                "seconds": round(self.seconds, 3), "output": self.output, "output_bytes": self.output_bytes,
                "timed_out": self.timed_out}


class ScriptFailed(RemoteError):
    """A plan script exited non-zero (or timed out, or could not start); `result` has
    its exit code and output tail (None when it could not start)."""

    def __init__(self, message: str, result: ScriptResult | None) -> None:
        super().__init__(message, details={"script": result.as_dict()} if result else {})
        self.result = result


class ScriptTimedOut(ScriptFailed):
    pass


class ScriptNotRunnable(ScriptFailed):
    pass


def script_env(*, plan: str, group: str, failover_type: str, vms: Sequence[str],
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(STANDBY_PLAN=plan, STANDBY_GROUP=group, STANDBY_FAILOVER_TYPE=str(failover_type),
               STANDBY_VMS=" ".join(vms))
    return env


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the script's process group, SIGKILL to what is left after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig is signal.SIGTERM:
                # The leader is gone; children that ignored SIGTERM may not be.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
        except subprocess.TimeoutExpired:
            continue


def run_script(path: str | Path, args: Sequence[str] = (), *, timeout: float = DEFAULT_SCRIPT_TIMEOUT,
               env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
               tail_bytes: int = TAIL_BYTES, kill_grace: float = 5.0, drain_seconds: float = 1.0,
               label: str | None = None) -> ScriptResult:
    """Run one script (see the module docstring); returns its result when it exits 0."""
    argv = [str(path), *args]
    name = label or str(path)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                close_fds=True)
    except OSError as exc:
        raise ScriptNotRunnable(f"script {name} could not be started: {exc.strerror or exc}", None) from exc
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    tail = bytearray()
    total = 0
    timed_out = False
    deadline = started + timeout
    exited_at: float | None = None
    eof = False
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and (eof or now - exited_at >= drain_seconds):
                    break
                if exited_at is None and now >= deadline:
                    timed_out = True
                    break
                if eof:   # output closed, the script still runs: wait for it
                    try:
                        proc.wait(timeout=max(0.0, min(deadline - now, 0.2)))
                    except subprocess.TimeoutExpired:
                        pass
                    continue
                limit = deadline if exited_at is None else exited_at + drain_seconds
                for _key, _ev in sel.select(max(0.0, min(limit - now, 0.2))):
                    try:
                        chunk = os.read(fd, _READ)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        eof = True
                        sel.unregister(fd)
                        break
                    total += len(chunk)
                    tail += chunk
                    if len(tail) > tail_bytes:
                        del tail[:len(tail) - tail_bytes]
        finally:
            if timed_out or exited_at is None:
                _kill_group(proc, kill_grace)
            proc.stdout.close()
    seconds = time.monotonic() - started
    result = ScriptResult(str(path), tuple(args), None if timed_out else proc.returncode, seconds,
                          bytes(tail).decode("utf-8", "replace"), total, timed_out)
    shown = result.output[-MESSAGE_TAIL_CHARS:]
    quoted = f"; last output:\n{shown}" if shown.strip() else "; no output"
    if timed_out:
        raise ScriptTimedOut(f"script {name} did not finish within {timeout:g} s and was killed with its "
                             f"process group{quoted}", result)
    rc = proc.returncode
    if rc != 0:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        raise ScriptFailed(f"script {name} {how} after {seconds:.1f} s{quoted}", result)
    return result


def run_plan_script(script: Script, *, plan: str, group: str, failover_type: str, vms: Sequence[str],
                    scripts_dir: str | Path | None = None, base_env: Mapping[str, str] | None = None,
                    kill_grace: float = 5.0) -> ScriptResult:
    """Run a plan's `Script`: a relative path is taken from `scripts_dir` (the control
    plane's scripts library), which is also the working directory."""
    path = Path(script.path)
    if not path.is_absolute():
        if scripts_dir is None:
            raise ScriptNotRunnable(f"script {script.path} is relative and no scripts directory is configured", None)
        path = Path(scripts_dir) / path
    env = script_env(plan=plan, group=group, failover_type=failover_type, vms=vms, base=base_env)
    # An absolute script must not fail because the (optional) library directory was never made.
    cwd = scripts_dir if scripts_dir is not None and Path(scripts_dir).is_dir() else None
    return run_script(path, script.args, timeout=script.timeout_seconds, env=env, cwd=cwd, kill_grace=kill_grace,
                      label=script.path)
