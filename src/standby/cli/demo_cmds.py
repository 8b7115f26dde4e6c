"""`standby demo`: the README's main job.

Builds the "single management server with two clouds" deployment on this machine (a
control plane, two agents, two test guests writing records), protects the guests and
shows replication health; see `standby.demo.run` for the stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from standby.errors import BadInput

console = Console(stderr=False)

# The repository's examples/ (the package is installed editable from the checkout).
DEFAULT_EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
DEFAULT_WORKDIR = Path("/var/tmp/standby-demo")


def demo_cmd(
    examples: Path = typer.Option(DEFAULT_EXAMPLES, "--examples", help="Folder holding the example fabrics."),
    workdir: Path = typer.Option(DEFAULT_WORKDIR, "--workdir",
                                 help="Where the demo keeps its VMs, control plane and agents (emptied first)."),
    cycles: int = typer.Option(2, "--cycles", min=1, max=20, help="Delta cycles to wait for per VM."),
    keep: bool = typer.Option(False, "--keep", help="Leave the control plane, agents and guests running."),
    recovery: bool = typer.Option(True, "--recovery/--no-recovery",
                                  help="Drill recovery after replicating: test failover and cleanup, planned "
                                       "failover (records lost counted), commit, reverse replication, failback."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object of the figures."),
) -> None:
    """Run the demo: two sites on this machine; protect two guests, replicate, drill recovery."""
    from standby.demo.run import Demo

    for name in ("single-server-two-clouds.yaml", "kvm-two-sites.yaml", "hyperv-vmm.yaml"):
        if not (examples / name).is_file():
            raise BadInput(f"--examples: {examples / name} not found (run from a checkout, or pass --examples DIR)")
    # Progress lines go to stderr under --json, so stdout holds exactly the JSON object.
    out = Console(stderr=True) if as_json else console
    demo = Demo(workdir, examples=examples, cycles=cycles, recovery=recovery,
                say=lambda m: out.print(m, highlight=False))
    try:
        result = demo.run()
        if not as_json:  # before the teardown, so the table's ages are those of now
            from standby.cli.control_cmds import items_table

            console.print(items_table(result.items))
    finally:
        demo.close(keep=keep)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
        return
    f = result.figures
    console.rule("[bold]summary")
    console.print(f"initial replication: {f['initial_replication_bytes'] / 1e6:.1f} MB in "
                  f"{f['initial_replication_seconds']} s; worst RPO {f['rpo_seconds_max']} s; "
                  f"{f['bytes_replicated'] / 1e6:.1f} MB replicated")
    if recovery:
        pf, fb, tf = f["planned_failover"], f["failback"], f["test_failover"]
        console.print(f"test failover: the test VM found {tf['test_vm_found_records']} records; source kept "
                      f"running: {tf['source_kept_running']}; replication continued: {tf['replication_continued']}")
        console.print(f"planned failover: {pf['records_lost']} records lost in {pf['seconds']} s; "
                      "reverse replication "
                      f"{f['reverse_replication_bytes'] / 1e6:.2f} MB; failback {fb['records_lost']} records lost, "
                      f"{fb['bytes_moved'] / 1e6:.2f} MB sent in {fb['seconds']} s")
    if keep:
        console.print(f"left running: control plane {result.url}, work dir {result.workdir}")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
