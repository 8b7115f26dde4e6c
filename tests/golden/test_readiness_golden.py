"""Golden readiness cases, as data.

Each file in readiness/ names one rule, a base fabric from bases/ (which must be
ready with no findings at all), and cases: a patch applied to the base and the
findings that rule must then report. Patches deep-merge mappings; a null value
deletes a key; lists are replaced whole. Expected findings match on severity and
subject, and on `message_contains` when given; only the named rule's findings count.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from standby.domain.fabric import Fabric
from standby.readiness.engine import all_rules, check

HERE = Path(__file__).parent
CASE_FILES = sorted((HERE / "readiness").glob("*.yaml"))
BASES = sorted((HERE / "bases").glob("*.yaml"))


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out.get(key), value)
        return out
    return copy.deepcopy(patch)


def load_base(name: str) -> dict[str, Any]:
    return yaml.safe_load((HERE / "bases" / f"{name}.yaml").read_text())


def cases() -> list[Any]:
    params = []
    for path in CASE_FILES:
        spec = yaml.safe_load(path.read_text())
        for case in spec["cases"]:
            params.append(pytest.param(spec["rule"], spec["base"], case, id=f"{spec['rule']}: {case['name']}"))
    return params


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.stem)
def test_base_is_ready_without_findings(base: Path) -> None:
    report = check(Fabric.model_validate(yaml.safe_load(base.read_text())))
    assert report.findings == []


@pytest.mark.parametrize(("rule_id", "base", "case"), cases())
def test_golden_case(rule_id: str, base: str, case: dict[str, Any]) -> None:
    fabric = Fabric.model_validate(merge(load_base(base), case.get("patch") or {}))
    got = [f for f in check(fabric).findings if f.rule == rule_id]
    expected = case["findings"]
    assert sorted((f.severity.value, f.subject) for f in got) == sorted((e["severity"], e["subject"]) for e in expected), \
        [f.as_dict() for f in got]
    for e in expected:
        if "message_contains" in e:
            assert any(f.subject == e["subject"] and e["message_contains"] in f.message for f in got), \
                [f.as_dict() for f in got]


def test_every_rule_has_a_passing_and_a_failing_case() -> None:
    specs = {}
    for path in CASE_FILES:
        spec = yaml.safe_load(path.read_text())
        assert path.stem == spec["rule"], f"{path.name} must be named after its rule"
        specs[spec["rule"]] = spec
    for r in all_rules():
        assert r.id in specs, f"no golden file for rule {r.id}"
        outcomes = {bool(c["findings"]) for c in specs[r.id]["cases"]}
        assert outcomes == {True, False}, f"{r.id} needs at least one passing and one failing case"
    unknown = set(specs) - {r.id for r in all_rules()}
    assert not unknown, f"golden files for rules that do not exist: {unknown}"
