"""Pure helpers of the control plane's orchestration: names and addresses of the live
fabric, readiness refusals, the lifecycle context of an item, job handler shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from standby.domain import fabric as fm
from standby.errors import BadInput, Refused
from standby.orchestration.livefabric import _ip_of, fabric_name
from standby.orchestration.protection import item_context, refuse_unless_ready
from standby.orchestration.registration import parse_address
from standby.orchestration.runner import JobHandler, Step
from standby.readiness.engine import Finding, Report, Severity


@pytest.mark.parametrize("raw, want", [
    ("web01", "web01"),
    ("my vm (copy)", "my-vm--copy-"),
    ("-lead", "x-lead"),
    ("", "unnamed"),
    ("üüü", "x---"),
])
def test_fabric_name_is_always_a_valid_fabric_name(raw: str, want: str) -> None:
    got = fabric_name(raw)
    assert got == want
    fm.Fabric(sites={got: fm.Site()})  # accepted by the model


def test_fabric_name_keeps_valid_names_and_caps_length() -> None:
    assert fabric_name("a" * 300) == "a" * 128
    assert fabric_name("host-1.example:7443") == "host-1.example:7443"


@pytest.mark.parametrize("address, ip", [
    ("10.0.0.5", "10.0.0.5"),
    ("10.0.0.5:7443", "10.0.0.5"),
    ("[fd00::1]:7443", "fd00::1"),
    ("fd00::1", "fd00::1"),
    ("host.example:7443", None),
    ("", None),
    (None, None),
])
def test_ip_of(address: str | None, ip: str | None) -> None:
    assert _ip_of(address) == ip


def test_parse_address() -> None:
    assert parse_address("10.0.0.5:7443") == ("10.0.0.5", 7443)
    with pytest.raises(BadInput):
        parse_address("10.0.0.5")


def _report(*severities: Severity) -> Report:
    return Report(["fabric", "kvm"], 3, [Finding(f"r{i}", sev, f"host/h{i}", f"problem {i}", "fix it")
                                         for i, sev in enumerate(severities)])


def test_refusal_carries_every_finding_and_names_the_first_error() -> None:
    refuse_unless_ready(_report(Severity.WARNING, Severity.INFO), "web01")  # warnings do not refuse
    with pytest.raises(Refused) as info:
        refuse_unless_ready(_report(Severity.WARNING, Severity.ERROR, Severity.ERROR), "web01")
    assert info.value.message == "VM web01 is not ready for protection: host/h1: problem 1 (and 1 more)"
    assert [f["rule"] for f in info.value.details["findings"]] == ["r0", "r1", "r2"]
    assert info.value.details["findings"][1] == {"rule": "r1", "severity": "error", "subject": "host/h1",
                                                 "message": "problem 1", "remedy": "fix it"}


def test_item_context_from_the_row() -> None:
    row = SimpleNamespace(vm=SimpleNamespace(name="web01"), last_recovery_point_id=None, details={})
    ctx = item_context(row)  # type: ignore[arg-type]
    assert ctx.vm == "web01" and not ctx.initial_replication_complete and not ctx.has_recovery_point
    row = SimpleNamespace(vm=SimpleNamespace(name="web01"), last_recovery_point_id="p1",
                          details={"test_failover_active": True, "reverse_in_sync": True})
    ctx = item_context(row)  # type: ignore[arg-type]
    assert ctx.initial_replication_complete and ctx.has_recovery_point
    assert ctx.test_failover_active and ctx.reverse_in_sync


def test_job_handler_needs_distinct_step_names() -> None:
    def noop(ctx: object) -> None:
        return None

    assert JobHandler([Step("a", noop), Step("b", noop)]).step_names == ["a", "b"]
    with pytest.raises(ValueError):
        JobHandler([Step("a", noop), Step("a", noop)])
    with pytest.raises(ValueError):
        JobHandler([])
