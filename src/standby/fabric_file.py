"""Load a fabric file (YAML) into the domain model, or fail with a FabricError that
names the file, the line and the field of every fault. Never a traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from standby.domain.fabric import Fabric, ReferenceProblems
from standby.errors import FabricError

# A real fabric of thousands of hosts is a few MB; anything bigger is a mistake.
MAX_FABRIC_BYTES = 8 * 1024 * 1024

Loc = tuple[str | int, ...]


class _LineLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys and remembers each node's line."""


def _compose(text: str) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML, returning (data, {path: 1-based line})."""
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[Loc, int] = {}
        _index(node, (), lines)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


# Aliases let a few lines expand into an exponential tree (a "billion laughs" file);
# no honest fabric needs more nodes than this.
MAX_NODES = 200_000


class _TooManyNodes(Exception):
    pass


def _index(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    if len(lines) >= MAX_NODES:
        raise _TooManyNodes
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise _DuplicateKey(loc + (key,), key_node.start_mark.line + 1, seen[key])
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
                _index(value_node, loc + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, loc + (i,), lines)


class _DuplicateKey(Exception):
    def __init__(self, loc: Loc, line: int, first: int) -> None:
        self.loc, self.line, self.first = loc, line, first


def _where(loc: Loc, lines: dict[Loc, int]) -> str:
    """'line 12: hosts.h1.os' using the deepest located ancestor of loc."""
    field = ".".join(str(p) for p in loc) or "(top level)"
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return f"line {lines[loc[:cut]]}: {field}"
    return field


def parse_fabric(text: str, source: str = "<fabric>") -> Fabric:
    """Validate fabric YAML text; raise FabricError naming `source` on any fault."""
    try:
        data, lines = _compose(text)
    except _DuplicateKey as dup:
        raise FabricError(source, [f"line {dup.line}: {'.'.join(map(str, dup.loc))}: "
                                   f"duplicate key (first defined on line {dup.first})"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise FabricError(source, [f"{where}not valid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise FabricError(source, [f"not valid YAML: {exc}"]) from None
    except _TooManyNodes:
        raise FabricError(source, [f"more than {MAX_NODES} values (after expanding aliases); not a fabric"]) from None
    except RecursionError:
        raise FabricError(source, ["nesting is too deep to be a fabric"]) from None
    if data is None:
        raise FabricError(source, ["the file is empty; a fabric needs at least servers and clouds"])
    if not isinstance(data, dict):
        raise FabricError(source, [f"line 1: the top level must be a mapping of sections, not a {type(data).__name__}"])
    try:
        return Fabric.model_validate(data)
    except ValidationError as exc:
        raise FabricError(source, _describe(exc, lines)) from None


def _describe(exc: ValidationError, lines: dict[Loc, int]) -> list[str]:
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ReferenceProblems):
            problems.extend(f"{_where(loc, lines)}: {msg}" for loc, msg in cause.problems)
            continue
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and the README's fabric reference)"
        elif err["type"] == "missing":
            message = "required field is missing"
        problems.append(f"{_where(loc, lines)}: {message}")
    return problems


def load_fabric(path: str | os.PathLike[str]) -> Fabric:
    """Read and validate a fabric file; every failure is a FabricError naming the file."""
    p = Path(path)
    source = str(p)
    try:
        size = p.stat().st_size
        if size > MAX_FABRIC_BYTES:
            raise FabricError(source, [f"the file is {size / 2**20:.1f} MiB; a fabric file may be at most "
                                       f"{MAX_FABRIC_BYTES // 2**20} MiB"])
        raw = p.read_bytes()
    except FabricError:
        raise
    except IsADirectoryError:
        raise FabricError(source, ["is a directory, not a fabric file"]) from None
    except OSError as exc:
        raise FabricError(source, [f"cannot be read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FabricError(source, [f"byte {exc.start}: not UTF-8 text"]) from None
    return parse_fabric(text, source)
