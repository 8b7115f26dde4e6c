"""The `standby check`, `standby rules` and `standby demo` contract: JSON shapes, exit
codes (0 ready, 1 not ready, 2 bad input, 70 a bug) and no traceback without --debug."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import standby
from standby.cli import readiness_cmds
from standby.cli.main import run
from standby.errors import (BadInput, Conflict, IntegrityError, NotFound, OutOfSpace, Refused, RemoteError,
                            StandbyError)
from standby.readiness.engine import PROFILES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KVM = str(EXAMPLES / "kvm-two-sites.yaml")
SINGLE = str(EXAMPLES / "single-server-two-clouds.yaml")
HYPERV = str(EXAMPLES / "hyperv-vmm.yaml")

# What hyperv-vmm.yaml is built to get wrong, one finding per fault (see its comments).
HYPERV_FINDINGS = {
    ("hv.vmm-version", "error", "server/vmm-recovery"),  # System Center 2012 < 2012 SP1
    ("hv.vmm-updates", "warning", "server/vmm-recovery"),  # updates_current: false
    ("hv.cloud-capability", "error", "cloud/dr"),  # capabilities: []
    ("hv.cluster-kb2961977", "error", "cluster/prod-cluster"),  # hv02 (2012 R2) lacks KB2961977
    ("hv.host-reaches-control-plane", "error", "host/hv11"),  # reaches_control_plane: false
    ("hv.limit-disk-types", "error", "vm/hv01/sql01"),  # a shared disk
    ("hv.limit-ipv4", "error", "vm/hv02/web01"),  # an IPv6 NIC
}


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def check_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc, out, err = invoke(capsys, "check", *args, "--json")
    assert "Traceback" not in err
    return rc, json.loads(out)


def assert_report_shape(report: dict[str, Any]) -> None:
    assert set(report) == {"ready", "profiles", "rules_run", "summary", "findings"}
    assert isinstance(report["ready"], bool)
    assert isinstance(report["profiles"], list) and set(report["profiles"]) <= set(PROFILES)
    assert isinstance(report["rules_run"], int) and report["rules_run"] > 0
    assert set(report["summary"]) == {"error", "warning", "info"}
    assert all(isinstance(n, int) and n >= 0 for n in report["summary"].values())
    for finding in report["findings"]:
        assert set(finding) == {"rule", "severity", "subject", "message", "remedy"}
        assert all(isinstance(v, str) and v for v in finding.values())
        assert finding["severity"] in {"error", "warning", "info"}
    for severity, count in report["summary"].items():
        assert count == sum(1 for f in report["findings"] if f["severity"] == severity)
    assert report["ready"] == (report["summary"]["error"] == 0)


# --- check ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [KVM, SINGLE, HYPERV])
def test_check_json_shape(capsys: pytest.CaptureFixture[str], path: str) -> None:
    rc, report = check_json(capsys, path)
    assert_report_shape(report)
    assert rc == (0 if report["ready"] else 1)


def test_kvm_two_sites_is_ready_with_no_findings(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = check_json(capsys, KVM)
    assert rc == 0
    assert report["ready"] is True
    assert report["profiles"] == ["fabric", "kvm"]
    assert report["findings"] == []
    assert report["summary"] == {"error": 0, "warning": 0, "info": 0}


def test_single_server_is_ready_with_one_warning(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = check_json(capsys, SINGLE)
    assert rc == 0
    assert report["ready"] is True
    assert [(f["rule"], f["severity"], f["subject"]) for f in report["findings"]] == [
        ("kvm.two-servers", "warning", "server/mgr")]


def test_hyperv_vmm_is_not_ready_with_exactly_its_faults(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = check_json(capsys, HYPERV)
    assert rc == 1
    assert report["ready"] is False
    assert report["profiles"] == ["fabric", "hyperv-vmm"]
    found = [(f["rule"], f["severity"], f["subject"]) for f in report["findings"]]
    assert len(found) == len(set(found))
    assert set(found) == HYPERV_FINDINGS
    assert report["summary"] == {"error": 6, "warning": 1, "info": 0}
    # Grouped by subject for the human report.
    subjects = [f["subject"] for f in report["findings"]]
    assert subjects == sorted(subjects)


@pytest.mark.parametrize(("path", "rc", "verdict"), [(KVM, 0, "READY"), (SINGLE, 0, "READY"),
                                                     (HYPERV, 1, "NOT READY")])
def test_check_human_output(capsys: pytest.CaptureFixture[str], path: str, rc: int, verdict: str) -> None:
    code, out, err = invoke(capsys, "check", path)
    assert code == rc
    assert err == ""
    last = out.strip().splitlines()[-1]
    assert last.startswith(verdict)


def test_hyperv_human_output_gives_a_remedy_per_finding(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = invoke(capsys, "check", HYPERV)
    text = " ".join(out.split())
    assert text.count("remedy:") == len(HYPERV_FINDINGS)
    for rule, _, subject in HYPERV_FINDINGS:
        assert rule in text and subject in text


def test_check_with_a_chosen_profile(capsys: pytest.CaptureFixture[str]) -> None:
    # Only the platform-neutral rules: the Hyper-V faults are not looked at.
    rc, report = check_json(capsys, HYPERV, "--profile", "fabric")
    assert rc == 0
    assert report["profiles"] == ["fabric"]
    assert report["findings"] == []
    rc, report = check_json(capsys, KVM, "--profile", "fabric", "--profile", "kvm")
    assert rc == 0
    assert report["profiles"] == ["fabric", "kvm"]


def test_check_unknown_profile_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = invoke(capsys, "check", KVM, "--profile", "nope")
    assert rc == 2
    assert out == ""
    assert "'nope'" in err and "--profile" in err
    assert "Traceback" not in err


def test_check_a_missing_file_is_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = invoke(capsys, "check", str(tmp_path / "absent.yaml"), "--json")
    assert rc == 2
    assert out == ""
    assert str(tmp_path / "absent.yaml") in err


# --- rules ------------------------------------------------------------------------------------

def rules_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, str]]:
    rc, out, err = invoke(capsys, "rules", *args, "--json")
    assert rc == 0, err
    rules = json.loads(out)
    assert isinstance(rules, list)
    return rules


def test_rules_json_hyperv(capsys: pytest.CaptureFixture[str]) -> None:
    rules = rules_json(capsys, "--profile", "hyperv-vmm")
    assert len(rules) >= 15
    for r in rules:
        assert set(r) == {"id", "profile", "severity", "requirement", "source"}
        assert r["profile"] == "hyperv-vmm"
        assert r["id"].startswith("hv.")
        assert r["severity"] in {"error", "warning", "info"}
        assert r["requirement"].strip()
        assert re.search(r"\bPRQ \d+\b", r["source"]) or r["source"].startswith("limit:"), r
    # Every row of the prerequisites table has at least one rule.
    rows = {int(n) for r in rules for n in re.findall(r"PRQ (\d+)", r["source"])}
    assert rows == set(range(1, 14))


def test_rules_json_all_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    rules = rules_json(capsys)
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids))
    assert {r["profile"] for r in rules} == set(PROFILES)
    for profile in PROFILES:
        assert [r for r in rules if r["profile"] == profile] == rules_json(capsys, "--profile", profile)


def test_rules_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = invoke(capsys, "rules", "--profile", "kvm")
    assert rc == 0 and err == ""
    n = len(rules_json(capsys, "--profile", "kvm"))
    assert out.strip().splitlines()[-1] == f"{n} rules"


def test_rules_unknown_profile_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = invoke(capsys, "rules", "--profile", "nope")
    assert rc == 2
    assert out == ""
    assert "'nope'" in err and "--profile" in err
    assert "Traceback" not in err


# --- the rest of the command line ---------------------------------------------------------------

def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = invoke(capsys, "--version")
    assert rc == 0
    assert out == f"standby {standby.__version__}\n"
    assert err == ""


def test_demo_with_a_folder_lacking_the_examples_is_bad_input(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    rc, out, err = invoke(capsys, "demo", "--examples", str(tmp_path))
    assert rc == 2
    assert "--examples" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [
    pytest.param([], id="no-arguments"),
    pytest.param(["check"], id="check-without-file"),
    pytest.param(["nope"], id="unknown-command"),
    pytest.param(["check", KVM, "--bogus"], id="unknown-option"),
    pytest.param(["rules", "--profile"], id="option-without-value"),
])
def test_usage_errors_exit_2_without_a_traceback(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    rc, out, err = invoke(capsys, *args)
    assert rc == 2
    assert "Traceback" not in out + err
    assert "Usage:" in out + err or "Error:" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = invoke(capsys, "--help")
    assert rc == 0
    assert "check" in out and "rules" in out and "demo" in out


# --- errors become exit codes in one place ------------------------------------------------------

def _raise(exc: BaseException) -> Any:
    def fail(*args: object, **kwargs: object) -> Any:
        raise exc
    return fail


def test_an_unexpected_exception_is_exit_70_without_a_traceback(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness_cmds, "check", _raise(RuntimeError("boom")))
    rc, out, err = invoke(capsys, "check", KVM)
    assert rc == 70
    assert "Traceback" not in out + err
    assert "internal error" in err and "RuntimeError" in err and "boom" in err
    assert "--debug" in err


def test_debug_shows_the_traceback_of_an_unexpected_exception(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness_cmds, "check", _raise(RuntimeError("boom")))
    rc, _, err = invoke(capsys, "--debug", "check", KVM)
    assert rc == 70
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: boom" in err


def test_an_unexpected_exception_in_rules_is_exit_70(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness_cmds, "all_rules", _raise(KeyError("profile")))
    rc, out, err = invoke(capsys, "rules", "--json")
    assert rc == 70
    assert out == ""
    assert "Traceback" not in err and "KeyError" in err


def test_markup_in_an_error_message_is_printed_literally(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness_cmds, "check", _raise(BadInput("value [bold]x[/bold] is bad")))
    rc, _, err = invoke(capsys, "check", KVM)
    assert rc == 2
    assert "value [bold]x[/bold] is bad" in err


@pytest.mark.parametrize("exc", [Refused("refused"), NotFound("gone"), Conflict("busy"), RemoteError("far"),
                                 IntegrityError("bad digest"), OutOfSpace("full"), StandbyError("plain")],
                         ids=lambda e: type(e).__name__)
def test_each_standby_error_has_its_exit_code(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                              exc: StandbyError) -> None:
    monkeypatch.setattr(readiness_cmds, "check", _raise(exc))
    rc, _, err = invoke(capsys, "check", KVM)
    assert rc == exc.exit_code
    assert exc.message in err
    assert "Traceback" not in err


def test_keyboard_interrupt_exits_130(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readiness_cmds, "check", _raise(KeyboardInterrupt()))
    rc, _, err = invoke(capsys, "check", KVM)
    assert rc == 130
    assert "Traceback" not in err
