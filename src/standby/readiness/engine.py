"""Readiness engine: rules are pure functions of a Fabric that yield problems; the
engine stamps each with its rule id and severity and picks the profiles to run from
the platforms of the fabric's management servers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from standby.domain.fabric import Fabric, Platform


class Severity(StrEnum):
    ERROR = "error"  # blocks protection
    WARNING = "warning"
    INFO = "info"


SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Severity
    subject: str
    message: str
    remedy: str

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Problem:
    """What a rule yields; the engine turns it into a Finding."""

    subject: str
    message: str
    remedy: str
    severity: Severity | None = None  # None: the rule's own severity


Check = Callable[[Fabric], Iterable[Problem]]


@dataclass(frozen=True)
class Rule:
    id: str
    profile: str
    severity: Severity
    requirement: str  # the prerequisite this rule implements, in one sentence
    source: str  # where the requirement comes from (reference table row, limit, design)
    check: Check = field(repr=False, compare=False)

    def run(self, fabric: Fabric) -> Iterator[Finding]:
        for p in self.check(fabric):
            yield Finding(self.id, p.severity or self.severity, p.subject, p.message, p.remedy)

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "profile": self.profile, "severity": str(self.severity),
                "requirement": self.requirement, "source": self.source}


# Profile name -> the server platform that selects it. "fabric" always runs.
PROFILES: dict[str, Platform | None] = {"fabric": None, "hyperv-vmm": Platform.HYPERV, "kvm": Platform.KVM}

_REGISTRY: dict[str, Rule] = {}


def rule(id: str, *, profile: str, severity: Severity, requirement: str, source: str) -> Callable[[Check], Check]:
    """Register a check function as a rule with a stable id."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}")

    def register(check: Check) -> Check:
        if id in _REGISTRY:
            raise ValueError(f"duplicate rule id {id!r}")
        _REGISTRY[id] = Rule(id, profile, severity, requirement, source, check)
        return check

    return register


def all_rules(profile: str | None = None) -> list[Rule]:
    _load_profiles()
    return [r for r in _REGISTRY.values() if profile is None or r.profile == profile]


def profiles_for(fabric: Fabric) -> list[str]:
    platforms = fabric.platforms()
    return [name for name, platform in PROFILES.items() if platform is None or platform in platforms]


@dataclass(frozen=True)
class Report:
    profiles: list[str]
    rules_run: int
    findings: list[Finding]

    @property
    def ready(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity is severity)

    def as_dict(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "profiles": self.profiles,
            "rules_run": self.rules_run,
            "summary": {s.value: self.count(s) for s in Severity},
            "findings": [f.as_dict() for f in self.findings],
        }


def check(fabric: Fabric, profiles: Iterable[str] | None = None) -> Report:
    chosen = list(profiles) if profiles is not None else profiles_for(fabric)
    rules = [r for r in all_rules() if r.profile in chosen]
    findings = [f for r in rules for f in r.run(fabric)]
    findings.sort(key=lambda f: (f.subject, SEVERITY_ORDER[f.severity], f.rule))
    return Report(chosen, len(rules), findings)


def _load_profiles() -> None:
    # Importing the profile modules registers their rules.
    from standby.readiness import common, hyperv, kvm  # noqa: F401
