"""Golden recovery plans, as data (plans/*.yaml).

A file has a `plan`, optionally `skip` (VMs already failed over), and `expected`: the dry
run of each failover type it lists; or `cases` of invalid plans with the `problems`
`load_plan` must report, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from standby.domain.plans import PlanError, dry_run, expand, load_plan

HERE = Path(__file__).parent / "plans"


def expansions() -> list[Any]:
    out = []
    for path in sorted(HERE.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for ftype, text in (spec.get("expected") or {}).items():
            out.append(pytest.param(spec, ftype, text, id=f"{path.stem}: {ftype}"))
    return out


def invalid() -> list[Any]:
    out = []
    for path in sorted(HERE.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text()).get("cases") or []:
            out.append(pytest.param(case, id=f"{path.stem}: {case['name']}"))
    return out


@pytest.mark.parametrize(("spec", "ftype", "text"), expansions())
def test_golden_expansion(spec: dict[str, Any], ftype: str, text: str) -> None:
    plan = load_plan(spec["plan"])
    assert dry_run(plan, ftype, skip=spec.get("skip") or ()) == text
    # the steps are JSON-able as the API returns them, and the plan round-trips
    json.dumps([s.as_dict() for s in expand(plan, ftype, skip=spec.get("skip") or ())])
    assert load_plan(json.loads(plan.model_dump_json())) == plan


@pytest.mark.parametrize("case", invalid())
def test_golden_invalid_plan(case: dict[str, Any]) -> None:
    with pytest.raises(PlanError) as e:
        load_plan(case["plan"])
    assert e.value.problems == case["problems"]
    assert e.value.exit_code == 2
