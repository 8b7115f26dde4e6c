"""Property tests: whatever the input, loading a fabric gives a Fabric or a FabricError,
nothing else; a fabric that loads can be checked without an exception; and
`standby check` exits 0, 1 or 2, never 70."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from standby.cli.main import run
from standby.domain import fabric as model
from standby.domain.fabric import Fabric
from standby.errors import FabricError
from standby.fabric_file import load_fabric, parse_fabric
from standby.readiness.engine import Report, check

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
EXAMPLE_DOCS = {p.name: yaml.safe_load(p.read_text()) for p in EXAMPLE_FILES}

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _field_names() -> list[str]:
    names: set[str] = set()
    for obj in vars(model).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel:
            names.update(obj.model_fields)
    return sorted(names)


def _names_in(doc: Any) -> set[str]:
    """Every string (key or value) in a document: the names a mutation can reuse."""
    found: set[str] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.add(str(key))
            found |= _names_in(value)
    elif isinstance(doc, list):
        for item in doc:
            found |= _names_in(item)
    elif isinstance(doc, str):
        found.add(doc)
    return found


FIELDS = _field_names()
SECTIONS = sorted(Fabric.model_fields)
KNOWN_STRINGS = sorted(set().union(*(_names_in(d) for d in EXAMPLE_DOCS.values())))

keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(KNOWN_STRINGS), st.text(max_size=12))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=24),
    st.sampled_from(KNOWN_STRINGS),
    st.sampled_from(["kvm", "hyperv", "2012 SP1", "2016", "0.0.1", "1.2.3.4.5", "::1", "KB1", "1.1", "0.10",
                     "static", "ipv6", "shared", "https://x", "", " ", "~", "yes"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                      max_leaves=30)
documents = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(SECTIONS), keys), values, max_size=8),
    values,
)


def outcome(text: str, source: str = "fuzz.yaml") -> Fabric | FabricError:
    """Parse; on success run every profile's rules. Any other exception fails the test."""
    try:
        fabric = parse_fabric(text, source)
    except FabricError as err:
        assert err.path == source
        assert err.message.startswith(f"{source}: invalid fabric file")
        assert err.problems and all(isinstance(p, str) and p.strip() for p in err.problems)
        return err
    assert isinstance(fabric, Fabric)
    report = check(fabric)
    assert isinstance(report, Report)
    json.dumps(report.as_dict())
    json.dumps(check(fabric, ["fabric", "hyperv-vmm", "kvm"]).as_dict())  # every rule, whatever the platform
    return fabric


# --- (a) random YAML documents -----------------------------------------------------------

@FUZZ
@given(documents)
def test_random_documents(doc: Any) -> None:
    outcome(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


# --- (b) mutations of the example fabrics -------------------------------------------------

def _locations(doc: Any, loc: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location below the root: (key...) paths into dicts and lists."""
    found: list[tuple[Any, ...]] = []
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    else:
        return found
    for key, value in items:
        found.append(loc + (key,))
        found.extend(_locations(value, loc + (key,)))
    return found


def _parent(doc: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc[:-1]:
        doc = doc[part]
    return doc


# Weighted so that about a third of the mutants still load and reach the readiness rules.
MUTATIONS = ["delete"] * 3 + ["same-kind"] * 4 + ["reuse-name"] * 2 + ["replace", "rename", "copy-entry",
                                                                        "duplicate-section"]


def _leaves_by_key(doc: Any, key: str = "", into: dict[str, set[Any]] | None = None) -> dict[str, set[Any]]:
    """{field name: the leaf values it has anywhere in the examples} (list items count for their list's key)."""
    into = {} if into is None else into
    if isinstance(doc, dict):
        for k, v in doc.items():
            _leaves_by_key(v, str(k), into)
    elif isinstance(doc, list):
        for item in doc:
            _leaves_by_key(item, key, into)
    else:
        into.setdefault(key, set()).add(doc)
    return into


LEAVES_BY_KEY: dict[str, set[Any]] = {}
for _doc in EXAMPLE_DOCS.values():
    for _key, _leaves in _leaves_by_key(_doc).items():
        LEAVES_BY_KEY.setdefault(_key, set()).update(_leaves)


def _same_kind(loc: tuple[Any, ...], value: Any) -> st.SearchStrategy[Any]:
    """Another value this field takes somewhere in the examples, or at least one of its type."""
    key = next((str(part) for part in reversed(loc) if isinstance(part, str)), "")
    seen = sorted(LEAVES_BY_KEY.get(key, set()), key=repr)
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, (int, float)):
        return st.one_of(st.integers(0, 100_000), st.floats(0, 1e6), st.sampled_from([0, 1, 65535, 1000.0]))
    if isinstance(value, str):
        return st.sampled_from(seen or KNOWN_STRINGS)
    if isinstance(value, list):
        return st.lists(st.sampled_from(seen or KNOWN_STRINGS), max_size=3)
    return st.just({})


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(EXAMPLE_DOCS)))
    doc = copy.deepcopy(EXAMPLE_DOCS[name])
    duplicate: str | None = None
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        locs = _locations(doc)
        if not locs:
            break
        loc = draw(st.sampled_from(locs))
        parent, last = _parent(doc, loc), loc[-1]
        op = draw(st.sampled_from(MUTATIONS))
        if op == "delete":
            del parent[last]
        elif op == "same-kind":  # a value of the same type: the fabric often still loads
            parent[last] = draw(_same_kind(loc, parent[last]))
        elif op == "replace":
            parent[last] = draw(values)
        elif op == "reuse-name":  # another name of the fabric: often still parses, and reaches the rules
            parent[last] = draw(st.sampled_from(sorted(_names_in(doc)) or KNOWN_STRINGS))
        elif op == "rename" and isinstance(parent, dict):
            new = draw(keys)
            parent[new] = parent.pop(last)
        elif op == "copy-entry" and isinstance(parent, dict):
            parent[draw(keys)] = copy.deepcopy(parent[last])
        elif op == "copy-entry" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif op == "duplicate-section" and isinstance(doc, dict) and doc:
            duplicate = draw(st.sampled_from(sorted(doc)))
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if duplicate is not None and isinstance(doc, dict) and duplicate in doc:
        text += yaml.safe_dump({duplicate: doc[duplicate]}, sort_keys=False, allow_unicode=True)
    return text


@FUZZ
@given(mutated_example())
def test_mutated_examples(text: str) -> None:
    outcome(text)


@st.composite
def edited_example_text(draw: st.DrawFn) -> str:
    """Line-level edits of an example file as written (comments, flow style and all)."""
    lines = draw(st.sampled_from(EXAMPLE_FILES)).read_text().splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "duplicate", "indent", "dedent", "insert", "truncate", "swap"]))
        if op == "drop":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = draw(st.sampled_from([" ", "  ", "\t"])) + lines[i]
        elif op == "dedent":
            lines[i] = lines[i][draw(st.integers(1, 4)):]
        elif op == "insert":
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.text(alphabet="{}[]:,-&*!|>'\"#%@`?<= \tax0.~", max_size=4)) + lines[i][pos:]
        elif op == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif op == "swap" and i + 1 < len(lines):
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        if not lines:
            break
    return "\n".join(lines) + "\n"


@FUZZ
@given(edited_example_text())
def test_edited_example_text(text: str) -> None:
    result = outcome(text)
    if isinstance(result, FabricError):
        # A syntax or shape fault in a file of 50+ lines should say where it is.
        assert all(p.startswith("line ") or "holds no settings" in p or "too deep" in p
                   for p in result.problems), result.problems


# --- (c) random bytes and text --------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(fuzz_dir: Path, raw: bytes) -> None:
    path = fuzz_dir / "bytes.yaml"
    path.write_bytes(raw)
    try:
        fabric = load_fabric(path)
    except FabricError as err:
        assert err.path == str(path)
        assert err.problems
        return
    assert isinstance(fabric, Fabric)
    check(fabric)


@FUZZ
@given(st.one_of(st.text(max_size=500),
                 st.text(alphabet="{}[]:,-&*!|>'\"#%@`?<=~ \t\n\rab01.\\\x00\x85\u2028\ufeff", max_size=300)))
def test_random_text(text: str) -> None:
    outcome(text)


# --- the CLI on a sample: exit 0, 1 or 2 and agreeing with the loader and the engine --------

@FEW
@given(st.one_of(mutated_example(), edited_example_text(), documents.map(yaml.safe_dump)))
def test_cli_check_exit_codes(fuzz_dir: Path, text: str) -> None:
    path = fuzz_dir / "cli.yaml"
    path.write_text(text, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run(["check", str(path), "--json"])
    assert rc in {0, 1, 2}, err.getvalue()
    assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue()
    result = outcome(text, str(path))
    if isinstance(result, FabricError):
        assert rc == 2
        assert str(path) in err.getvalue()
    else:
        report = json.loads(out.getvalue())
        assert report["ready"] == check(result).ready
        assert rc == (0 if report["ready"] else 1)


# --- faults found by fuzzing, fixed in the domain model ------------------------------------------

def test_a_version_too_long_for_int_is_refused() -> None:
    text = (EXAMPLES / "kvm-two-sites.yaml").read_text().replace('libvirt_version: "9.0.0"',
                                                                  f'libvirt_version: "{"9" * 5000}"', 1)
    assert isinstance(outcome(text), FabricError)


@pytest.mark.parametrize(("old", "new"), [
    ("clock_skew_seconds: 0.4", "clock_skew_seconds: .nan"),
    ("size_gib: 20}", "size_gib: .inf}"),
    ("port: 7443", "port: true"),
    ("storage_free_gib: 2000", "storage_free_gib: .inf"),
])
def test_non_numbers_are_refused(old: str, new: str) -> None:
    text = (EXAMPLES / "kvm-two-sites.yaml").read_text()
    assert old in text
    assert isinstance(outcome(text.replace(old, new, 1)), FabricError)
