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
    """A safe loader whose every construction failure is a marked YAML error.

    SafeConstructor lets Python's own errors escape for some well-formed scalars
    (an integer of more than 4300 digits, the date 2020-13-45, a timestamp offset of
    99 hours); those become ConstructorErrors pointing at the value's line.
    Duplicate keys and lines are handled by `_index`."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # Refuse deep nesting while composing, before Python's recursion limit: fast,
        # and the error can point at the line.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels; not a fabric",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, ArithmeticError, TypeError) as exc:
            if isinstance(exc, yaml.YAMLError):
                raise
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {_clip(node.value) if isinstance(node, yaml.ScalarNode) else ''}"
                f"({exc})", node.start_mark) from None


def _clip(value: object, limit: int = 40) -> str:
    text = repr(value)
    return (text[:limit] + "...' " if len(text) > limit else text + " ")


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
# The deepest fabric setting (hosts.H.vms.V.nics.N.address_families.I) is 8 levels down.
MAX_DEPTH = 64


class _TooManyNodes(Exception):
    pass


class _TooDeep(Exception):
    pass


def _index(node: yaml.Node, loc: Loc, lines: dict[Loc, int], line: int | None = None) -> None:
    """Record the line of every value: a mapping entry's is its key's line (a block value
    starts on the next line, but the user wrote, and looks for, the key)."""
    if len(lines) >= MAX_NODES:
        raise _TooManyNodes
    if len(loc) > MAX_DEPTH:  # past the composer's check, only an alias inside itself gets here
        raise _TooDeep
    lines[loc] = line if line is not None else node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise _DuplicateKey(loc + (key,), key_node.start_mark.line + 1, seen[key])
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
                _index(value_node, loc + (key,), lines, seen[key])
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
    except yaml.reader.ReaderError as exc:
        # Not marked: a character YAML forbids (NUL, most control characters).
        line = text.count("\n", 0, exc.position) + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise FabricError(source, [f"line {line}: not valid YAML: character {char} is not allowed "
                                   f"({exc.reason})"]) from None
    except yaml.YAMLError as exc:
        raise FabricError(source, [f"not valid YAML: {' '.join(str(exc).split())}"]) from None
    except _TooManyNodes:
        raise FabricError(source, [f"more than {MAX_NODES} values (after expanding aliases); not a fabric"]) from None
    except (_TooDeep, RecursionError):
        raise FabricError(source, [f"nesting is too deep to be a fabric (more than {MAX_DEPTH} levels, "
                                   "or an alias inside itself)"]) from None
    if data is None:
        raise FabricError(source, ["the file holds no settings (it is empty, only comments or null); "
                                   "a fabric needs at least servers and clouds"])
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
        if err["type"] == "value_error":
            # A model-level check whose message starts with the field it is about
            # ("version '2013' is not ...") is located at that field, not the model.
            field = message.split(" ", 1)[0]
            if loc + (field,) in lines:
                loc = loc + (field,)
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
    too_big = f"a fabric file may be at most {MAX_FABRIC_BYTES // 2**20} MiB"
    try:
        size = p.stat().st_size
        if size > MAX_FABRIC_BYTES:
            raise FabricError(source, [f"the file is {size / 2**20:.1f} MiB; {too_big}"])
        # Read at most one byte past the limit: a device or pipe (/dev/zero) has no size.
        with p.open("rb") as f:
            raw = f.read(MAX_FABRIC_BYTES + 1)
        if len(raw) > MAX_FABRIC_BYTES:
            raise FabricError(source, [f"more than {MAX_FABRIC_BYTES // 2**20} MiB to read; {too_big}"])
    except FabricError:
        raise
    except IsADirectoryError:
        raise FabricError(source, ["is a directory, not a fabric file"]) from None
    except OSError as exc:
        raise FabricError(source, [f"cannot be read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FabricError(source, [f"line {line}, byte {exc.start}: not UTF-8 text "
                                   "(save the file as UTF-8)"]) from None
    return parse_fabric(text, source)
