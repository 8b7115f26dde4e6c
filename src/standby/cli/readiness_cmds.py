"""`standby check` and `standby rules`: readiness of a fabric file, and the rule catalogue."""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from standby.errors import BadInput
from standby.fabric_file import load_fabric
from standby.readiness.engine import PROFILES, Report, Severity, all_rules, check

console = Console()

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def render_report(report: Report, source: str, out: Console = console) -> None:
    """A table per subject, then a verdict line."""
    out.print(f"[bold]Readiness of {escape(source)}[/]  profiles: {', '.join(report.profiles)}  "
              f"rules run: {report.rules_run}")
    if not report.findings:
        out.print("[green]No findings.[/]")
    for subject, group in groupby(report.findings, key=lambda f: f.subject):
        out.print()
        out.print(f"[bold]{escape(subject)}[/]")
        table = Table(box=None, show_header=False, padding=(0, 1), expand=False)
        table.add_column("severity", no_wrap=True)
        table.add_column("rule", no_wrap=True, style="dim")
        table.add_column("finding")
        for f in group:
            table.add_row(f"[{_STYLE[f.severity]}]{f.severity}[/]", f.rule,
                          f"{escape(f.message)}\n[green]remedy:[/] {escape(f.remedy)}")
        out.print(table)
    out.print()
    counts = ", ".join(f"{report.count(s)} {s}" for s in Severity)
    verdict = "[bold green]READY[/]" if report.ready else "[bold red]NOT READY[/]: errors block protection"
    out.print(f"{verdict} ({counts})")


def check_cmd(
    fabric: Path = typer.Argument(..., help="Fabric file (YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
    profile: list[str] = typer.Option(None, "--profile", help="Run only these profiles (default: by platform)."),
) -> None:
    """Check a deployment against every prerequisite. Exit 0 ready, 1 not ready, 2 bad input."""
    for p in profile or []:
        if p not in PROFILES:
            raise BadInput(f"--profile: unknown profile {p!r}; one of {', '.join(PROFILES)}")
    report = check(load_fabric(fabric), profile or None)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render_report(report, str(fabric))
    raise typer.Exit(0 if report.ready else 1)


def rules_cmd(
    profile: str = typer.Option(None, "--profile", help="Only this profile."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """List every readiness rule with its id, profile, severity and requirement."""
    if profile is not None and profile not in PROFILES:
        raise BadInput(f"--profile: unknown profile {profile!r}; one of {', '.join(PROFILES)}")
    rules = all_rules(profile)
    if as_json:
        print(json.dumps([r.describe() for r in rules], indent=2))
        return
    table = Table(expand=True)
    for col in ("id", "profile", "severity", "requirement", "source"):
        table.add_column(col, no_wrap=col in ("id", "profile", "severity"))
    for r in rules:
        table.add_row(r.id, r.profile, f"[{_STYLE[r.severity]}]{r.severity}[/]", escape(r.requirement), escape(r.source))
    console.print(table)
    console.print(f"{len(rules)} rules")


def register(app: typer.Typer) -> None:
    app.command("check")(check_cmd)
    app.command("rules")(rules_cmd)
