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
    site_loss: bool = typer.Option(False, "--site-loss",
                                   help="Instead: lose the primary site with its control plane (two sites as "
                                        "network namespaces, each with PostgreSQL and a control plane): promote, "
                                        "recovery plan (RTO, records lost), the site's return, break glass."),
    as_json: bool = typer.Option(False, "--json", help="End with one JSON object of the figures."),
) -> None:
    """Run the demo: two sites on this machine; protect two guests, replicate, drill recovery."""
    from standby.demo.run import Demo

    if site_loss:
        _site_loss(workdir, keep=keep, as_json=as_json)
        return

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


def _site_loss(workdir: Path, *, keep: bool, as_json: bool) -> None:
    import shutil

    from standby.demo.site_loss import SiteLossDrill
    from standby.errors import NotReady
    from standby.testing import guest, libvirtd, netns, postgres

    for why in (libvirtd.available(), netns.available(), postgres.reason_unavailable()):
        if why:
            raise NotReady(f"the site-loss demo cannot run here: {why}")
    libvirtd.ensure_running()
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open("qemu:///system")
    out = Console(stderr=True) if as_json else console
    work = workdir / "site-loss"
    if work.exists():
        shutil.rmtree(work)
    drill = SiteLossDrill(work, conn, guest.build(), names=("web", "db"), say=lambda m: out.print(m, highlight=False))
    try:
        drill.setup()
        drill.lose_site_a()
        drill.site_a_returns()
        drill.break_glass()
    finally:
        if not keep:
            drill.close()
        conn.close()
    f = drill.figures
    if as_json:
        print(json.dumps({"stages": [{"name": n, "seconds": round(s, 1), "detail": d} for n, s, d in drill.stages],
                          "figures": f}, indent=2, default=str))
        return
    sl, rt, bg = f["site_loss"], f["return"], f["break_glass"]
    console.rule("[bold]summary")
    console.print(f"site a lost: cp-b promoted in {sl['promote_seconds']} s; RTO {sl['rto_seconds']} s from the "
                  f"declaration to every VM running; records lost {sl['records_lost']} (one RPO of writes is "
                  f"{sl['records_per_rpo']})")
    console.print(f"site a back: {rt['fenced']} fenced; reverse replication "
                  f"{ {k: round(v / 1e6, 2) for k, v in rt['reverse_bytes'].items()} } MB; failback records lost "
                  f"{rt['failback_records_lost']}")
    console.print(f"no control plane: break glass in {bg['rto_seconds']} s; records lost {bg['records_lost']}; "
                  "taken in by the control plane when it answered again")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
