"""Replication from the command line, without a control plane: the CA, the agent, one-off
replication of an image, recovery points of a local replica store, offline seeds.

    standby ca init DIR
    standby ca issue DIR NAME --san 10.0.0.5 --san host.example
    standby agent receive --listen 0.0.0.0:7443 --store /var/lib/standby --cert C --key K --ca CA
    standby replicate IMAGE --to HOST:PORT --disk-id ID [--seed|--hash-scan|--changed-extents F]
    standby points list --store DIR --disk-id ID
    standby points verify --store DIR --disk-id ID [--point P | --all]
    standby points show --store DIR (--vm VM | --disk-id ID) [--point P]
    standby seed export IMAGE DEST --disk-id ID      (on the primary)
    standby seed import SRC --store DIR              (on the secondary)

TLS files default to $STANDBY_TLS_CERT, $STANDBY_TLS_KEY and $STANDBY_TLS_CA.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from standby.domain.bandwidth import Schedule, ScheduleError, parse_rate
from standby.errors import BadInput, IntegrityError

console = Console()
err_console = Console(stderr=True)

ca_app = typer.Typer(help="A small certificate authority for the replication links (mutual TLS).",
                     no_args_is_help=True)
points_app = typer.Typer(help="Recovery points of a local replica store (on the secondary host).",
                         no_args_is_help=True)
seed_app = typer.Typer(help="Offline initial replication: export a seed, carry it, import it.", no_args_is_help=True)

_CERT = typer.Option(..., "--cert", envvar="STANDBY_TLS_CERT", help="This host's certificate (PEM).")
_KEY = typer.Option(..., "--key", envvar="STANDBY_TLS_KEY", help="This host's private key (PEM).")
_CA = typer.Option(..., "--ca", envvar="STANDBY_TLS_CA", help="The CA certificate both ends trust (PEM).")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------------------- ca


@ca_app.command("init")
def ca_init(directory: Path = typer.Argument(..., help="Directory for ca.key (0600) and ca.crt."),
            name: str = typer.Option("Standby CA", "--name", help="The CA's common name."),
            days: int = typer.Option(3650, "--days", help="Validity in days.")) -> None:
    """Create a CA (ECDSA P-256 key and self-signed certificate)."""
    from standby.replication.tls import init_ca

    path = init_ca(directory, name, days)
    console.print(f"CA created: {escape(str(path))} (key {escape(str(directory / 'ca.key'))}, mode 0600)")


@ca_app.command("issue")
def ca_issue(directory: Path = typer.Argument(..., help="The CA directory."),
             name: str = typer.Argument(..., help="Host name (certificate CN; files NAME.crt, NAME.key)."),
             san: list[str] = typer.Option(None, "--san", help="DNS name or IP address (repeatable); default NAME."),
             days: int = typer.Option(825, "--days", help="Validity in days."),
             out: Path = typer.Option(None, "--out", help="Write the files here instead of the CA directory.")) -> None:
    """Issue a host certificate (serverAuth + clientAuth) signed by the CA."""
    from standby.replication.tls import issue

    ident = issue(directory, name, san or None, days=days, out_dir=out)
    console.print(f"issued {escape(str(ident.cert))} and {escape(str(ident.key))} (mode 0600) "
                  f"for {escape(', '.join(san or [name]))}")


# ---------------------------------------------------------------------------- replicate


def _schedule(bwlimit: str | None, schedule: str | None) -> Schedule | None:
    try:
        rate = parse_rate(bwlimit) if bwlimit else None
        if schedule:
            sched = Schedule.parse(schedule)
            if bwlimit:
                sched = Schedule(sched.windows, rate)
            return sched
        if bwlimit:
            return Schedule((), rate) if rate is not None else None
    except ScheduleError as exc:
        raise BadInput(str(exc)) from None
    return None


def replicate_cmd(
    image: Path = typer.Argument(..., help="Source disk image (raw)."),
    to: str = typer.Option(..., "--to", help="The agent, HOST:PORT."),
    disk_id: str = typer.Option(..., "--disk-id", help="The disk's id on the agent."),
    changed_extents: Path = typer.Option(None, "--changed-extents",
                                         help="File of changed extents (JSON [[offset, length], ...] or lines "
                                              "'OFFSET LENGTH')."),
    hash_scan: bool = typer.Option(False, "--hash-scan", help="Compare every block with the replica's digests."),
    seed: bool = typer.Option(False, "--seed", help="Initial replication of an empty replica (resumable)."),
    streams: int = typer.Option(4, "--streams", min=1, max=64, help="Parallel TLS streams."),
    bwlimit: str = typer.Option(None, "--bwlimit", help="Bandwidth limit, e.g. 20MiB/s or 100Mbit."),
    schedule: str = typer.Option(None, "--schedule",
                                 help='Time-of-day limits, e.g. "08:00-18:00=10MiB/s, otherwise unlimited" '
                                      "(--bwlimit then sets the 'otherwise' rate)."),
    compress: str = typer.Option("auto", "--compress",
                                 help="on, off or auto (compress only while the link is the bottleneck)."),
    no_compress: bool = typer.Option(False, "--no-compress", help="Send blocks uncompressed (--compress off)."),
    consistency: str = typer.Option("crash", "--consistency", help="crash or app."),
    state_dir: Path = typer.Option(None, "--state-dir", envvar="STANDBY_SENDER_STATE",
                                   help="Sender state directory (default ~/.local/state/standby/sender)."),
    timeout: float = typer.Option(60.0, "--timeout", min=1.0, metavar="SECONDS",
                                  help="The sender's I/O timeout: give up on the agent when a connect, a "
                                       "send or an expected answer takes longer than this (default 60)."),
    cert: Path = _CERT, key: Path = _KEY, ca: Path = _CA,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress bar)."),
) -> None:
    """Replicate one cycle of IMAGE to an agent and print a summary. Without a mode flag:
    a seed if the replica is empty, else a hash scan."""
    from standby.replication.changes import ExtentSource, FullSource, HashScanSource, read_extents_file
    from standby.replication.protocol import Consistency
    from standby.replication.sender import Endpoint, SenderOptions, compress_mode, probe, run_cycle
    from standby.replication.tls import Identity, client_context

    if sum(bool(x) for x in (changed_extents, hash_scan, seed)) > 1:
        raise BadInput("choose one of --changed-extents, --hash-scan and --seed")
    endpoint = Endpoint.parse(to)
    ctx = client_context(Identity(cert, key, ca))
    opts = SenderOptions(streams=streams, compress="off" if no_compress else compress_mode(compress),
                         schedule=_schedule(bwlimit, schedule),
                         state_dir=state_dir or Path.home() / ".local" / "state" / "standby" / "sender",
                         consistency=Consistency.from_label(consistency), timeout=timeout)
    if changed_extents:
        source: Any = ExtentSource(image, read_extents_file(changed_extents))
    elif hash_scan:
        source = HashScanSource(image)
    elif seed:
        source = FullSource(image)
    else:
        hello = probe(endpoint, ctx, disk_id, FullSource(image).size, timeout=timeout)
        source = FullSource(image) if hello.latest_point is None else HashScanSource(image)
    if as_json:
        result = run_cycle(source, endpoint, ctx, disk_id, opts)
        print(json.dumps(result.as_dict(), indent=2))
        return
    with Progress(TextColumn(f"[bold]{escape(disk_id)}[/] {source.kind.name.lower().replace('_', ' ')}"),
                  BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("replicate", total=source.total_bytes())
        lock = threading.Lock()

        def advance(n: int) -> None:
            with lock:
                bar.advance(task, n)

        result = run_cycle(source, endpoint, ctx, disk_id, opts, progress=advance)
    _print_summary(result, opts)


def _print_summary(r: Any, opts: Any) -> None:
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("point", f"{r.point_id} (disk {escape(r.disk_id)}, {r.kind}, base {r.base_point or 'none'})")
    t.add_row("examined", _human(r.bytes_examined))
    t.add_row("read", _human(r.bytes_read))
    t.add_row("sent on wire", f"{_human(r.wire_bytes)} over {r.streams} stream(s)")
    t.add_row("blocks", f"{r.data_blocks} data, {r.zero_blocks} zero, {r.skipped_blocks} unchanged"
                        + (f", {r.resumed_blocks} already staged (resumed)" if r.resumed_blocks else ""))
    t.add_row("time", f"{r.seconds:.2f} s" + (f" ({r.throttled_seconds:.1f} s throttled)"
                                              if r.throttled_seconds else ""))
    t.add_row("throughput", f"{_human(r.throughput)}/s examined, {_human(r.wire_bytes / max(r.seconds, 1e-9))}/s "
                            "on the wire")
    if opts.schedule is not None:
        t.add_row("bandwidth", escape(opts.schedule.describe()))
    t.add_row("digest", r.digest)
    console.print(t)


# ---------------------------------------------------------------------------- points


def _fmt_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@points_app.command("list")
def points_list(store: Path = typer.Option(..., "--store", help="Replica store directory."),
                disk_id: str = typer.Option(..., "--disk-id", help="The disk."),
                as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List a disk's recovery points, oldest first."""
    from standby.replication.store import ReplicaStore

    pts = ReplicaStore(store).disk(disk_id).points()
    if as_json:
        print(json.dumps([{"id": p.id, "seq": p.seq, "created_at": p.created_at, "consistency": p.consistency,
                           "digest": p.digest, "bytes_changed": p.bytes_changed,
                           "blocks_changed": p.blocks_changed, "meta": p.meta} for p in pts], indent=2))
        return
    t = Table(title=f"recovery points of {escape(disk_id)}")
    for col in ("id", "time", "consistency", "changed", "blocks", "digest"):
        t.add_column(col, no_wrap=True)
    for p in pts:
        t.add_row(p.id, _fmt_time(p.created_at), p.consistency, _human(p.bytes_changed), str(p.blocks_changed),
                  p.digest[:12])  # the full digest is in --json
    console.print(t)
    console.print(f"{len(pts)} point(s)")


@points_app.command("show")
def points_show(store: Path = typer.Option(..., "--store", help="Replica store directory."),
                vm: str = typer.Option(None, "--vm", help="A VM: its whole recovery point (all its disks)."),
                disk_id: str = typer.Option(None, "--disk-id", help="Or one disk's point."),
                point: str = typer.Option("latest", "--point",
                                          help="latest, latest_app_consistent or a point id (with --vm); "
                                               "a point id or latest (with --disk-id)."),
                as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show a recovery point with what it carries to start the VM without the control
    plane: the VM's definition, its disks' points, the network mapping and the policy."""
    from standby.domain import vm_point
    from standby.replication import catalog
    from standby.replication.store import ReplicaStore, meta_digest

    if (vm is None) == (disk_id is None):
        raise BadInput("give --vm VM or --disk-id ID (one of them)")
    rs = ReplicaStore(store)
    if disk_id is not None:
        disk = rs.disk(disk_id)
        rec = disk.latest() if point == "latest" else disk.point(point)
        if rec is None:
            raise BadInput(f"disk {disk_id} has no recovery point")
        sealed = rec.meta_digest is not None and meta_digest(rec.meta) == rec.meta_digest
        manifest = vm_point.of_meta(rec.meta)
        out: dict[str, Any] = {"disk_id": disk_id, "point": rec.id, "created_at": rec.created_at,
                               "consistency": rec.consistency, "digest": rec.digest, "meta_sealed": sealed,
                               "manifest": manifest.as_dict() if manifest else None,
                               "startable": bool(manifest and manifest.startable)}
        title = f"point {rec.id} of disk {disk_id}"
    else:
        vp = catalog.choose(rs, vm, point, now=time.time())
        out = {**vp.as_dict(), "meta_sealed": True}
        manifest, title = vp.manifest, f"recovery point {vp.id} of VM {vm}"
    if as_json:
        print(json.dumps(out, indent=2))
        return
    console.print(f"[bold]{escape(title)}[/]")
    console.print(f"  taken {_fmt_time(out['created_at'])}, {out['consistency']}-consistent; meta seal "
                  + ("[green]ok[/]" if out["meta_sealed"] else "[red]missing or broken[/]"))
    if "disks" in out:
        t = Table(title="disks")
        for col in ("target", "replica disk", "point"):
            t.add_column(col, no_wrap=True)
        targets = {d: tg for tg, d in (manifest.disks.items() if manifest else [])}
        for d, pid in out["disks"].items():
            t.add_row(targets.get(d, "?"), escape(d), pid)
        console.print(t)
    if manifest is None:
        console.print("  no VM manifest (a point from before manifests, or the VM's definition could not "
                      "be read): a failover of it needs the control plane")
        return
    console.print(f"  VM {escape(manifest.vm)}, cycle {escape(manifest.cycle)}, item "
                  f"{manifest.item_id if manifest.item_id is not None else '-'}")
    if manifest.networks:
        t = Table(title="network mapping")
        for col in ("NIC", "primary network", "secondary network"):
            t.add_column(col, no_wrap=True)
        for n in manifest.networks:
            t.add_row(n.mac or "-", escape(n.primary or "-"), escape(n.secondary or "(not connected)"))
        console.print(t)
    if manifest.policy:
        console.print("  policy: " + ", ".join(f"{k} {escape(str(v))}" for k, v in sorted(manifest.policy.items())))
    console.print("  definition: " + (f"{len(manifest.domain_xml)} characters of libvirt XML (--json shows it)"
                                      if manifest.domain_xml else "[red]none[/]"))
    console.print("  startable without the control plane: " + ("[green]yes[/]" if out["startable"] else "[red]no[/]"))


@points_app.command("verify")
def points_verify(store: Path = typer.Option(..., "--store", help="Replica store directory."),
                  disk_id: str = typer.Option(..., "--disk-id", help="The disk."),
                  point: str = typer.Option(None, "--point", help="The point (default: the latest)."),
                  all_points: bool = typer.Option(False, "--all", help="Verify every retained point."),
                  as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Re-read a point's whole chain and check it against its recorded disk digest (exit 6 on mismatch)."""
    from standby.replication.store import ReplicaStore

    disk = ReplicaStore(store).disk(disk_id)
    if all_points:
        ids = [p.id for p in disk.points()]
    elif point:
        ids = [point]
    else:
        latest = disk.latest()
        if latest is None:
            raise BadInput(f"disk {disk_id} has no recovery point to verify")
        ids = [latest.id]
    results = [disk.verify(i) for i in ids]
    if as_json:
        print(json.dumps([{"point": r.point_id, "ok": r.ok, "expected_digest": r.expected_digest,
                           "actual_digest": r.actual_digest, "blocks": r.blocks, "seconds": round(r.seconds, 3),
                           "mismatched_blocks": r.mismatched_blocks[:100], "problems": r.problems}
                          for r in results], indent=2))
    else:
        for r in results:
            verdict = "[green]OK[/]" if r.ok else "[bold red]MISMATCH[/]"
            console.print(f"point {r.point_id}: {verdict} ({r.blocks} blocks in {r.seconds:.2f} s, "
                          f"digest {r.actual_digest or '?'})")
            for p in r.problems:
                console.print(f"  {escape(p)}")
    bad = [r.point_id for r in results if not r.ok]
    if bad:
        raise IntegrityError(f"disk {disk_id}: point(s) {', '.join(bad)} do not match their digest")


@points_app.command("materialize")
def points_materialize(dest: Path = typer.Argument(..., help="Overlay file to create (qcow2)."),
                       store: Path = typer.Option(..., "--store", help="Replica store directory."),
                       disk_id: str = typer.Option(..., "--disk-id", help="The disk."),
                       point: str = typer.Option(None, "--point", help="The point (default: the latest)."),
                       as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Make a writable copy-on-write overlay of a point (for failover); the point is pinned until released."""
    from standby.replication.store import ReplicaStore

    disk = ReplicaStore(store).disk(disk_id)
    if point is None:
        latest = disk.latest()
        if latest is None:
            raise BadInput(f"disk {disk_id} has no recovery point to materialize")
        point = latest.id
    path = disk.materialize(point, dest)
    if as_json:
        print(json.dumps({"point": point, "overlay": str(path)}))
    else:
        console.print(f"point {point} of {escape(disk_id)} materialized at {escape(str(path))} (pinned)")


@points_app.command("release")
def points_release(dest: Path = typer.Argument(..., help="An overlay made by `points materialize`."),
                   store: Path = typer.Option(..., "--store", help="Replica store directory."),
                   disk_id: str = typer.Option(..., "--disk-id", help="The disk.")) -> None:
    """Unpin the point under an overlay (the overlay file is left to you to delete)."""
    from standby.replication.store import ReplicaStore

    ReplicaStore(store).disk(disk_id).release(dest)
    console.print(f"released {escape(str(dest))}")


@points_app.command("prune")
def points_prune(store: Path = typer.Option(..., "--store", help="Replica store directory."),
                 disk_id: str = typer.Option(..., "--disk-id", help="The disk."),
                 retention_hours: float = typer.Option(0.0, "--retention-hours",
                                                       help="Keep one point per hour for this long (0: latest only)."),
                 app_consistent_hours: float = typer.Option(None, "--app-consistent-hours",
                                                            help="Keep app-consistent points this long."),
                 keep_all_minutes: float = typer.Option(0.0, "--keep-all-minutes",
                                                        help="Keep every point this recent."),
                 as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Remove the points a retention policy does not keep (the latest and pinned points always stay)."""
    import time

    from standby.domain.retention import RetentionPolicy
    from standby.replication.store import ReplicaStore

    try:
        policy = RetentionPolicy(retention_hours, app_consistent_hours, keep_all_minutes)
    except ValueError as exc:
        raise BadInput(f"retention policy: {exc}") from None
    removed = ReplicaStore(store).disk(disk_id).prune(policy, time.time())
    if as_json:
        print(json.dumps({"removed": removed}))
    else:
        console.print(f"removed {len(removed)} point(s){': ' + ', '.join(removed) if removed else ''}")


# ---------------------------------------------------------------------------- seeds


@seed_app.command("export")
def seed_export(image: Path = typer.Argument(..., help="Source disk image (raw)."),
                dest: Path = typer.Argument(..., help="Seed directory to write (carried to the secondary)."),
                disk_id: str = typer.Option(..., "--disk-id", help="The disk's id at the secondary."),
                state_dir: Path = typer.Option(None, "--state-dir", envvar="STANDBY_SENDER_STATE",
                                               help="Sender state directory (records the seed's digest table "
                                                    "so the first catch-up cycle needs no scan)."),
                as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Export a seed of IMAGE; import it at the secondary with `standby seed import`, then
    catch up with `standby replicate --hash-scan` (or --changed-extents)."""
    from standby.replication.seeding import export_image_seed

    result = export_image_seed(image, dest, disk_id,
                               state_dir or Path.home() / ".local" / "state" / "standby" / "sender")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(f"seed of {escape(str(image))} written to {escape(str(dest))}: point {result['point']}, "
                      f"{_human(result['data_bytes'])} of data, digest {result['digest']} "
                      f"({result['seconds']:.1f} s)")


@seed_app.command("import")
def seed_import(src: Path = typer.Argument(..., help="Seed directory made by `standby seed export`."),
                store: Path = typer.Option(..., "--store", help="Replica store directory."),
                disk_id: str = typer.Option(None, "--disk-id", help="Disk id (default: the one in the seed)."),
                as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Import a seed as the first recovery point of a disk."""
    from standby.replication.store import ReplicaStore

    t0 = time.perf_counter()
    point = ReplicaStore(store).import_seed(src, disk_id)
    out = {"point": point.id, "digest": point.digest, "bytes": point.bytes_changed,
           "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        console.print(f"seed imported: point {point.id}, digest {point.digest}, {_human(point.bytes_changed)} "
                      f"({out['seconds']:.1f} s)")


def register(app: typer.Typer) -> None:
    from standby.cli import agent_cmds

    app.add_typer(ca_app, name="ca")
    agent_cmds.register(app)  # `standby agent receive|register|run`
    app.command("replicate")(replicate_cmd)
    app.add_typer(points_app, name="points")
    app.add_typer(seed_app, name="seed")

