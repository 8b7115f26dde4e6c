"""Plan scripts run as real subprocesses (orchestration/scripts.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from standby.domain.plans import Script
from standby.orchestration.scripts import (
    TAIL_BYTES,
    ScriptFailed,
    ScriptNotRunnable,
    ScriptTimedOut,
    run_plan_script,
    run_script,
)


def sh(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_script_that_succeeds_gets_the_plan_environment(tmp_path: Path) -> None:
    sh(tmp_path, "ok.sh", 'echo "plan=$STANDBY_PLAN group=$STANDBY_GROUP type=$STANDBY_FAILOVER_TYPE"\n'
                          'for vm in $STANDBY_VMS; do echo "vm $vm"; done\necho "args $*"; echo "cwd $(pwd)"\n'
                          'echo to-stderr >&2\ncat   # stdin is /dev/null: returns at once\n')
    r = run_plan_script(Script(path="ok.sh", args=["--site", "two words"]), plan="erp", group="db",
                        failover_type="planned", vms=["db01", "db02"], scripts_dir=tmp_path)
    assert r.returncode == 0 and not r.timed_out and not r.truncated
    assert r.output == ("plan=erp group=db type=planned\nvm db01\nvm db02\nargs --site two words\n"
                        f"cwd {tmp_path}\nto-stderr\n")
    assert r.output_bytes == len(r.output)


def test_an_absolute_script_runs_when_the_scripts_library_does_not_exist(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    p = sh(tmp_path, "abs.sh", f'echo "$STANDBY_GROUP" > {marker}\n')
    r = run_plan_script(Script(path=str(p)), plan="erp", group="db", failover_type="test", vms=["db01"],
                        scripts_dir=tmp_path / "no-such-library")
    assert r.returncode == 0 and marker.read_text() == "db\n"


def test_a_failing_script_fails_with_its_exit_code_and_output_tail(tmp_path: Path) -> None:
    p = sh(tmp_path, "fail.sh", "echo checking the database\necho 'replica lag: 120 s' >&2\nexit 3\n")
    with pytest.raises(ScriptFailed) as e:
        run_script(p)
    assert not isinstance(e.value, ScriptTimedOut)
    msg = str(e.value)
    assert msg.startswith(f"script {p} exited with code 3 after ")
    assert msg.endswith("last output:\nchecking the database\nreplica lag: 120 s\n")
    assert e.value.result is not None and e.value.result.returncode == 3
    assert e.value.details["script"]["returncode"] == 3
    assert e.value.exit_code == 5   # the CLI's code for a failed remote side


def test_a_script_killed_by_a_signal_says_so(tmp_path: Path) -> None:
    with pytest.raises(ScriptFailed, match=r"was killed by signal 9 .*; no output"):
        run_script(sh(tmp_path, "k.sh", "kill -9 $$\n"))


def test_a_script_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    p = sh(tmp_path, "slow.sh", f"sleep 60 &\necho $! > {pidfile}\necho started\nwait\n")
    t0 = time.monotonic()
    with pytest.raises(ScriptTimedOut) as e:
        run_script(p, timeout=0.5, kill_grace=1.0)
    assert time.monotonic() - t0 < 5
    assert "did not finish within 0.5 s and was killed with its process group; last output:\nstarted\n" \
        in str(e.value)
    assert e.value.result is not None and e.value.result.timed_out and e.value.result.returncode is None
    assert gone(int(pidfile.read_text()))     # the background child went with it


def test_a_script_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    p = sh(tmp_path, "stubborn.sh", f"trap '' TERM\n(trap '' TERM; sleep 60) &\necho $! > {pidfile}\nsleep 60\n")
    t0 = time.monotonic()
    with pytest.raises(ScriptTimedOut):
        run_script(p, timeout=0.3, kill_grace=0.3)
    assert time.monotonic() - t0 < 5
    assert gone(int(pidfile.read_text()))


def test_lots_of_output_keeps_only_the_tail(tmp_path: Path) -> None:
    p = sh(tmp_path, "loud.sh", "head -c 5000000 /dev/zero | tr '\\0' x\necho\necho END\nexit 1\n")
    with pytest.raises(ScriptFailed) as e:
        run_script(p)
    r = e.value.result
    assert r is not None and r.output_bytes == 5000000 + 5 and r.truncated
    assert len(r.output) == TAIL_BYTES and r.output.endswith("x\nEND\n")
    assert len(str(e.value)) < 4200   # the message quotes the end of the tail only
    assert str(e.value).endswith("xx\nEND\n")


def test_a_background_child_holding_the_output_does_not_hold_the_step(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    p = sh(tmp_path, "daemon.sh", f"sleep 30 &\necho $! > {pidfile}\necho started a service\n")
    t0 = time.monotonic()
    r = run_script(p, drain_seconds=0.3)
    assert time.monotonic() - t0 < 3
    assert r.returncode == 0 and r.output == "started a service\n"
    pid = int(pidfile.read_text())
    assert not gone(pid, within=0.2)   # left alone: a script may start a service
    os.kill(pid, 9)


def test_a_script_that_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(ScriptNotRunnable, match="could not be started: No such file"):
        run_script(tmp_path / "missing.sh")
    noexec = tmp_path / "noexec.sh"
    noexec.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(ScriptNotRunnable, match="Permission denied"):
        run_script(noexec)
    with pytest.raises(ScriptNotRunnable, match="relative and no scripts directory"):
        run_plan_script(Script(path="x.sh"), plan="p", group="g", failover_type="test", vms=[])


def test_invalid_utf8_output_is_replaced_not_fatal(tmp_path: Path) -> None:
    r = run_script(sh(tmp_path, "bin.sh", "printf 'ok \\377\\376\\n'\n"))
    assert r.output == "ok \ufffd\ufffd\n"
