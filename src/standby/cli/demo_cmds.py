"""`standby demo`: the README's main job.

For now it checks the shipped example fabrics: one ready deployment and one blocked
deployment with a remedy per finding. Later stages grow it into the full two-site
demo (protect, replicate, fail over, fail back)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from standby.cli.readiness_cmds import render_report
from standby.errors import BadInput
from standby.fabric_file import load_fabric
from standby.readiness.engine import check

console = Console()

# The repository's examples/ (the package is installed editable from the checkout).
DEFAULT_EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
DEMO_FABRICS = ("single-server-two-clouds.yaml", "kvm-two-sites.yaml", "hyperv-vmm.yaml")


def demo_cmd(
    examples: Path = typer.Option(DEFAULT_EXAMPLES, "--examples", help="Folder holding the example fabrics."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of the results."),
) -> None:
    """Run the demo: readiness of the example deployments (ready and blocked)."""
    results: dict[str, object] = {}
    for name in DEMO_FABRICS:
        path = examples / name
        if not path.is_file():
            raise BadInput(f"--examples: {path} not found (run from a checkout, or pass --examples DIR)")
        report = check(load_fabric(path))
        results[name] = report.as_dict()
        if not as_json:
            console.rule(f"[bold]{name}")
            render_report(report, str(path), console)
    if as_json:
        print(json.dumps({"readiness": results}, indent=2))
    else:
        ready = [n for n, r in results.items() if r["ready"]]  # type: ignore[index]
        console.rule("[bold]summary")
        console.print(f"{len(ready)} of {len(results)} example deployments are ready: {', '.join(ready)}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
