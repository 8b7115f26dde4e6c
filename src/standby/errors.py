"""Every error Standby raises on purpose.

Each class carries a message template (its docstring style, filled from keyword
arguments), the CLI exit code and the HTTP status it maps to. The CLI and the API
translate errors in one place each (`cli/main.py`, later `api/`); nothing else
decides exit codes.

Exit codes are stable and documented in the README:

    0  success / ready
    1  not ready (readiness found errors) or an operation refused by the rules
    2  bad input (a file, an argument, a request)
    3  not found
    4  conflict with the current state
    5  a remote side failed (agent, hypervisor, network)
    6  integrity failure (digest mismatch, corrupt metadata)
    7  out of space
   70  internal error (a bug: please report it)
"""

from __future__ import annotations

from typing import Any, ClassVar


class StandbyError(Exception):
    """Root of every deliberate Standby error."""

    exit_code: ClassVar[int] = 70
    http_status: ClassVar[int] = 500
    template: ClassVar[str] = "{message}"

    def __init__(self, message: str | None = None, /, *, details: dict[str, Any] | None = None,
                 **fields: Any) -> None:
        self.fields = fields
        # Structured data for the API's `error.details` (a readiness refusal's findings);
        # JSON-serializable by convention. Empty unless the raiser gives some.
        self.details: dict[str, Any] = dict(details) if details else {}
        if message is None:
            message = self.template.format(**fields)
        self.message = message
        super().__init__(message)


class BadInput(StandbyError):
    """A file, argument or request is malformed or refers to something undefined."""

    exit_code = 2
    http_status = 400


class FabricError(BadInput):
    """A fabric file cannot be loaded.

    `problems` holds one line per fault, each naming the field (and line, when known).
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: invalid fabric file\n{lines}")


class NotReady(StandbyError):
    """Readiness checks found blocking problems."""

    exit_code = 1
    http_status = 409


class Refused(StandbyError):
    """An operation is refused by the rules (a transition not allowed, a limit)."""

    exit_code = 1
    http_status = 409


class NotFound(StandbyError):
    exit_code = 3
    http_status = 404


class Conflict(StandbyError):
    exit_code = 4
    http_status = 409


class RemoteError(StandbyError):
    """A remote side (agent, hypervisor, network peer) failed."""

    exit_code = 5
    http_status = 502


class Passive(RemoteError):
    """This control plane is the passive standby: changes go to the active one."""

    http_status = 503


class IntegrityError(StandbyError):
    """Data does not match its checksum or digest, or metadata is corrupt."""

    exit_code = 6
    http_status = 500


class OutOfSpace(StandbyError):
    exit_code = 7
    http_status = 507
