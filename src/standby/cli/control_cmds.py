"""The control plane from the command line: a client of its REST API over HTTPS
(docs/control-plane.md). Nothing here imports the server; every call goes through
`standby.client.ApiClient`, whose errors carry the server's message and exit code.

    standby status | items | readiness
    standby protect VM | unprotect VM | pause VM | resume VM | replicate-now VM | resync VM
    standby jobs [show|watch|cancel ID]    standby alerts [clear ID]
    standby policy create|list|show|update|delete    standby pair | pairings | unpair
    standby network map|list|unmap|create     standby inventory clouds|hosts|vms
    standby agents [revoke]   standby keys create|list|revoke   standby tokens create|list|revoke
    standby webhooks add|list|remove

Every command takes --url (STANDBY_URL), --token (STANDBY_TOKEN; or STANDBY_TOKEN_FILE),
--ca (STANDBY_CA) and --json (exactly one JSON document on stdout).
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import sys
import time
from collections.abc import Callable
from enum import Enum
from itertools import groupby
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from standby.client import DEFAULT_URL, ApiClient, error_class
from standby.errors import BadInput, RemoteError, StandbyError

console = Console()
err_console = Console(stderr=True)

JOB_STATES = ("queued", "running", "succeeded", "failed", "errored", "cancelled")
JOB_TERMINAL = frozenset({"succeeded", "failed", "errored", "cancelled"})
STEP_DONE = frozenset({"succeeded", "failed", "errored", "skipped", "cancelled"})
_HEALTH_STYLE = {"normal": "green", "warning": "yellow", "critical": "bold red"}
_SEVERITY_STYLE = {"error": "bold red", "critical": "bold red", "warning": "yellow", "info": "cyan"}
_STATE_STYLE = {"succeeded": "green", "failed": "bold red", "errored": "bold red", "cancelled": "yellow",
                "running": "cyan", "skipped": "dim"}


class CopyFrequency(str, Enum):
    S30 = "30s"
    M5 = "5m"
    M15 = "15m"
    CONTINUOUS = "continuous"


FREQUENCY_SECONDS = {"30s": 30, "5m": 300, "15m": 900, "continuous": 0}


class Initial(str, Enum):
    NOW = "now"
    SCHEDULED = "scheduled"
    OFFLINE = "offline"


class Authentication(str, Enum):
    CERTIFICATE = "certificate"
    KERBEROS = "kerberos"


class Role(str, Enum):
    OPERATOR = "operator"
    VIEWER = "viewer"


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class JobStateChoice(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ERRORED = "errored"
    CANCELLED = "cancelled"


# ---------------------------------------------------------------------------- connection options


class Ctx:
    """What every command gets: the --json flag and a client made on first use (a group's
    callback that only passes through to a subcommand never connects)."""

    def __init__(self, url: str | None, token: str | None, ca: str | None, as_json: bool) -> None:
        self.url, self.token, self.ca, self.json = url, token, ca, as_json
        self._api: ApiClient | None = None

    @property
    def api(self) -> ApiClient:
        if self._api is None:
            self._api = ApiClient.from_env(self.url, self.token, self.ca)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()

    def emit(self, data: Any, render: Callable[[Any], None]) -> None:
        """One JSON document with --json, else the human rendering."""
        if self.json:
            print_json(data)
        else:
            render(data)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


# Named cp_* so that a command's own parameters (a webhook's `url`) cannot clash with them.
_CONN_PARAMS = [
    ("cp_url", str, typer.Option(DEFAULT_URL, "--url", envvar="STANDBY_URL", show_default=True,
                              help="The control plane, https://HOST:PORT.")),
    ("cp_token", str | None, typer.Option(None, "--token", envvar="STANDBY_TOKEN", show_default=False,
                                       help="API token (prefer $STANDBY_TOKEN or $STANDBY_TOKEN_FILE: an argument "
                                            "is visible to other users in ps).")),
    ("cp_ca", str | None, typer.Option(None, "--ca", envvar="STANDBY_CA", show_default=False,
                                    help="CA certificate that signed the control plane's (DATA_DIR/ca/ca.crt).")),
    ("as_json", bool, typer.Option(False, "--json", help="Print one JSON document.")),
]


_CONN_DEFAULTS = {"cp_url": DEFAULT_URL, "cp_token": None, "cp_ca": None, "as_json": False}


def api_command(group: typer.Typer, name: str | None = None, *, callback: bool = False,
                **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn(c: Ctx, ...)` as a command with the connection options added to its
    signature: about forty commands share them, and Typer reads options from signatures.

    A group's callback (`standby jobs`) passes its options down, so `standby jobs --json
    show 7` and `standby jobs show 7 --json` mean the same."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for n, p in sig.parameters.items() if n != "c"]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
                 for n, ann, opt in _CONN_PARAMS]
        # Typer hands the context to one parameter only: the command's own, if it has one.
        ctx_name = next((p.name for p in own if p.annotation is typer.Context), None)
        if ctx_name is None:
            extra.append(inspect.Parameter("_cp_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(fn)
        def wrapper(**kw: Any) -> Any:
            tctx: typer.Context = kw[ctx_name] if ctx_name else kw.pop("_cp_ctx")
            conn = {k: kw.pop(k) for k in _CONN_DEFAULTS}
            inherited = tctx.obj if isinstance(tctx.obj, dict) else {}
            # An option left at its default takes the value the group's callback was given.
            conn = {k: inherited.get(k, v) if v == _CONN_DEFAULTS[k] else v for k, v in conn.items()}
            if callback:
                tctx.obj = conn
            c = Ctx(conn["cp_url"], conn["cp_token"], conn["cp_ca"], conn["as_json"])
            try:
                return fn(c, **kw)
            finally:
                c.close()

        wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        if callback:
            group.callback(invoke_without_command=True, **kwargs)(wrapper)
        else:
            group.command(name, **kwargs)(wrapper)
        return fn

    return deco


def seg(value: str | int) -> str:
    """A path segment: VM and object names may hold characters a URL path does not."""
    return quote(str(value), safe="")


# ---------------------------------------------------------------------------- formatting


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def fmt_duration(seconds: float | None) -> str:
    """A short human duration: 45s, 5m 03s, 2h 10m, 3d 4h."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)  # the API's times are UTC


def fmt_time(value: str | None, tz: dt.tzinfo | None = None) -> str:
    """An API time in local time (or `tz`), to the second."""
    t = parse_time(value)
    if t is None:
        return value or "-"
    return t.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def fmt_age(value: str | None, now: dt.datetime | None = None) -> str:
    t = parse_time(value)
    if t is None:
        return value or "never"
    now = now or dt.datetime.now(dt.timezone.utc)
    delta = (now - t).total_seconds()
    return f"{fmt_duration(delta)} ago" if delta >= 0 else f"in {fmt_duration(-delta)}"


def fmt_frequency(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    names = {v: k for k, v in FREQUENCY_SECONDS.items()}
    return names.get(seconds, f"{seconds}s")


def styled(value: str | None, styles: dict[str, str]) -> str:
    text = escape(value or "-")
    style = styles.get(value or "")
    return f"[{style}]{text}[/]" if style else text


def _table(title: str, columns: list[str], rows: list[list[str]], **kw: Any) -> Table | str:
    if not rows:
        return f"no {title}"  # an empty table says less than this
    t = Table(title=title, title_justify="left", **kw)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


def items_table(items: list[dict[str, Any]], now: dt.datetime | None = None) -> Table | str:
    rows = [[escape(str(i.get("vm", "?"))), escape(str(i.get("state", "-"))), styled(i.get("health"), _HEALTH_STYLE),
             escape(i.get("health_reason") or i.get("error") or ""), fmt_duration(i.get("rpo_seconds")),
             fmt_age(i.get("last_recovery_point_at"), now) if i.get("last_recovery_point_at") else "none",
             fmt_bytes(i.get("bytes_replicated"))] for i in items]
    return _table("protected items", ["VM", "state", "health", "reason", "RPO", "last point", "bytes"], rows)


def render_findings(findings: list[dict[str, Any]], title: str, out: Console | None = None) -> None:
    """Findings grouped by subject, as `standby check` prints them."""
    out = out or console
    out.print(f"[bold]{escape(title)}[/]")
    if not findings:
        out.print("[green]No findings.[/]")
    for subject, group in groupby(findings, key=lambda f: f.get("subject", "")):
        out.print()
        out.print(f"[bold]{escape(str(subject))}[/]")
        table = Table(box=None, show_header=False, padding=(0, 1), expand=False)
        table.add_column("severity", no_wrap=True)
        table.add_column("rule", no_wrap=True, style="dim")
        table.add_column("finding")
        for f in group:
            table.add_row(styled(f.get("severity"), _SEVERITY_STYLE), escape(str(f.get("rule", ""))),
                          f"{escape(str(f.get('message', '')))}\n[green]remedy:[/] {escape(str(f.get('remedy', '')))}")
        out.print(table)
    out.print()
    counts = {s: sum(1 for f in findings if f.get("severity") == s) for s in ("error", "warning", "info")}
    ready = counts["error"] == 0
    verdict = "[bold green]READY[/]" if ready else "[bold red]NOT READY[/]: errors block protection"
    out.print(f"{verdict} ({', '.join(f'{n} {s}' for s, n in counts.items())})")


# ---------------------------------------------------------------------------- jobs: following


def job_line(job: dict[str, Any]) -> str:
    text = f"job {job.get('id')} {job.get('kind', '')} {job.get('target', '')}".rstrip()
    return f"{text}: {job.get('state')}" + (f" ({job['progress']}%)" if job.get("state") == "running" else "")


def job_events(prev: dict[str, Any] | None, cur: dict[str, Any]) -> list[str]:
    """Plain lines for what changed between two polls of a job (the output without a TTY)."""
    lines: list[str] = []
    before = {s.get("position", n): s for n, s in enumerate((prev or {}).get("steps") or [])}
    for n, step in enumerate(cur.get("steps") or []):
        old = before.get(step.get("position", n))
        changed = old is None or old.get("state") != step.get("state") or (
            step.get("message") and old.get("message") != step.get("message"))
        if changed and (old is not None or step.get("state") != "pending"):
            msg = f": {step['message']}" if step.get("message") else ""
            lines.append(f"  step {step.get('name')}: {step.get('state')}{msg}")
    if prev is None or prev.get("state") != cur.get("state"):
        lines.append(job_line(cur) + (f": {cur['error']}" if cur.get("error") else ""))
    return lines


def job_outcome(job: dict[str, Any]) -> StandbyError | None:
    """The error a finished job stands for (None when it succeeded): the class and exit
    code the job's result names, else failed -> exit 1, errored -> 5, cancelled -> 1."""
    state = job.get("state")
    if state == "succeeded":
        return None
    result = job.get("result") if isinstance(job.get("result"), dict) else {}
    reason = job.get("error") or job.get("message") or state
    message = f"job {job.get('id')} ({job.get('kind')}) {state}: {reason}"
    type_name = result.get("error_type") if isinstance(result.get("error_type"), str) else None
    code = result.get("exit_code") if isinstance(result.get("exit_code"), int) else None
    if type_name or code:
        return error_class(type_name, 409, code)(message)
    if state == "errored":  # a control-plane bug or restart: the remote side failed
        return RemoteError(message)
    return error_class("JobFailed" if state == "failed" else "JobCancelled", 409, 1)(message)


class _Bars:
    """A rich progress bar per step of a job, and one for the job."""

    def __init__(self, out: Console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=out)
        self.job_task: TaskID | None = None
        self.steps: dict[Any, TaskID] = {}

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def update(self, job: dict[str, Any]) -> None:
        p = self.progress
        state = styled(job.get("state"), _STATE_STYLE)
        if self.job_task is None:
            self.job_task = p.add_task(f"[bold]job {job.get('id')} {escape(str(job.get('kind', '')))}[/]",
                                       total=100, state=state)
        p.update(self.job_task, completed=job.get("progress") or 0, state=state)
        for n, step in enumerate(job.get("steps") or []):
            key = step.get("position", n)
            if key not in self.steps:
                self.steps[key] = p.add_task(f"  {escape(str(step.get('name')))}", total=100, state="")
            done = step.get("state") in STEP_DONE
            msg = f" {escape(step['message'])}" if step.get("message") and not done else ""
            p.update(self.steps[key], completed=100 if done else step.get("progress") or 0,
                     state=styled(step.get("state"), _STATE_STYLE) + msg)
            if done:
                p.stop_task(self.steps[key])  # its clock stops with it
        if job.get("state") in JOB_TERMINAL:
            p.update(self.job_task, completed=100 if job.get("state") == "succeeded" else job.get("progress") or 0)
            p.stop_task(self.job_task)


POLL_SECONDS = 1.0  # how often a job is polled while followed


def follow_job(api: ApiClient, job: dict[str, Any], *, interval: float | None = None, timeout: float | None = None,
               quiet: bool = False, out: Console | None = None) -> dict[str, Any]:
    """Poll a job until it ends; show a bar per step on a terminal, plain lines otherwise
    (nothing when quiet). Returns the last state of the job."""
    out = out or err_console
    deadline = None if timeout is None else time.monotonic() + timeout
    job_id = job["id"]

    def poll(show: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        cur = job
        show(cur)
        while cur.get("state") not in JOB_TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteError(f"job {job_id} has not ended after {timeout:g} s (state {cur.get('state')}); "
                                  f"it goes on: standby jobs watch {job_id}")
            time.sleep(POLL_SECONDS if interval is None else interval)
            cur = api.get(f"/jobs/{job_id}")
            show(cur)
        return cur

    try:
        if quiet:
            return poll(lambda j: None)
        if out.is_terminal:
            with _Bars(out) as bars:
                return poll(bars.update)
        prev: list[dict[str, Any] | None] = [None]

        def lines(cur: dict[str, Any]) -> None:
            for line in job_events(prev[0], cur):
                out.print(line, highlight=False, soft_wrap=True, markup=False)
            prev[0] = cur

        return poll(lines)
    except KeyboardInterrupt:
        err_console.print(f"stopped watching; job {job_id} goes on (standby jobs watch {job_id})")
        raise


def _finish(c: Ctx, data: Any, job: dict[str, Any] | None, render: Callable[[Any], None]) -> None:
    """Print the outcome, then fail with the job's error if it did not succeed."""
    c.emit(data, render)
    if job is not None and job.get("state") in JOB_TERMINAL:
        err = job_outcome(job)
        if err is not None:
            raise err


def _wait_opts(default: bool) -> Any:
    return typer.Option(default, "--wait/--no-wait", help="Follow the job until it ends.")


_TIMEOUT = typer.Option(None, "--timeout", min=1.0, metavar="SECONDS",
                        help="With --wait: stop waiting after this long (the job goes on; exit 5).")


# ---------------------------------------------------------------------------- status, items, readiness

top = typer.Typer()  # a holder for the top-level commands, copied onto the main app in register()


@api_command(top, "status")
def status_cmd(c: Ctx) -> None:
    """Health summary of the control plane: items by health and state, agents, alerts, jobs."""
    status = c.api.get("/status")
    health = c.api.get("/health")
    status = {**status, "role": {k: health.get(k) for k in ("role", "name", "epoch", "active_url", "reason")}}
    items = c.api.get_all("/items")
    c.emit({"status": status, "items": items}, lambda _: render_status(status, items))


def render_status(status: dict[str, Any], items: list[dict[str, Any]]) -> None:
    counts = status.get("items") or {}
    by_health = counts.get("by_health") or {}
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    role = status.get("role") or {}
    where = ""
    if role.get("role") == "passive":
        where = f" [yellow]passive[/]: {escape(str(role.get('reason') or ''))}; active: {escape(str(role.get('active_url')))}"
    elif role.get("role"):
        where = f", {escape(str(role.get('name')))} active (epoch {role.get('epoch')})"
    t.add_row("control plane", escape(str(status.get("version", "?"))) + where)
    t.add_row("items", f"{counts.get('total', 0)} (" + ", ".join(
        f"{styled(h, _HEALTH_STYLE)} {n}" for h, n in by_health.items()) + ")")
    if counts.get("by_state"):
        t.add_row("states", escape(", ".join(f"{s} {n}" for s, n in sorted(counts["by_state"].items()))))
    agents = status.get("agents") or []
    ok = sum(1 for a in agents if a.get("heartbeat_ok"))
    t.add_row("agents", f"{len(agents)} ({ok} with a recent heartbeat)")
    for a in agents:
        if not a.get("heartbeat_ok"):
            t.add_row("", f"[yellow]{escape(a.get('name', '?'))}[/]: {escape(a.get('state', ''))}, last heartbeat "
                          f"{fmt_age(a.get('last_heartbeat_at'))}")
    alerts = status.get("open_alerts", 0)
    t.add_row("open alerts", f"[bold red]{alerts}[/]" if alerts else "0")
    t.add_row("running jobs", str(status.get("running_jobs", 0)))
    console.print(t)
    if items:
        console.print(items_table(items))


@api_command(top, "items")
def items_cmd(c: Ctx) -> None:
    """Protected items with state, health, RPO, last recovery point and bytes replicated."""
    items = c.api.get_all("/items")
    c.emit(items, lambda data: console.print(items_table(data)))


@api_command(top, "readiness")
def readiness_cmd(c: Ctx) -> None:
    """Readiness of the live fabric (the inventory agents reported). Exit 0 ready, 1 not ready."""
    report = c.api.get("/readiness")
    c.emit(report, lambda r: render_findings(r.get("findings") or [], f"Readiness of the fabric at {c.api.base_url}"))
    raise typer.Exit(0 if report.get("ready") else 1)


# ---------------------------------------------------------------------------- protection


def _item_job_line(res: dict[str, Any], verb: str) -> None:
    item, job = res.get("item") or {}, res.get("job")
    tail = f" (job {job['id']}: {job.get('state')})" if job else ""
    console.print(f"{escape(str(item.get('vm', '?')))}: {verb}; state {escape(str(item.get('state')))}{tail}",
                  highlight=False)


def _run_item_op(c: Ctx, res: dict[str, Any], verb: str, wait: bool, timeout: float | None) -> None:
    job = res.get("job")
    if wait and job:
        if not c.json:
            err_console.print(f"job {job['id']} ({job.get('kind')}) started", highlight=False)
        job = follow_job(c.api, job, timeout=timeout, quiet=c.json)
        res = {**res, "job": job}
        ref = (res.get("item") or {}).get("id")
        if ref is not None:
            try:  # the item as the job left it
                res["item"] = c.api.get(f"/items/{seg(ref)}")
            except StandbyError:
                pass  # gone (unprotect deletes it): keep the last copy
    _finish(c, res, job, lambda r: _item_job_line(r, verb))


@api_command(top, "protect")
def protect_cmd(c: Ctx,
                vm: str = typer.Argument(..., help="The VM (name as the inventory has it)."),
                host: str = typer.Option(None, "--host", help="The VM's host, when its name is not unique."),
                policy: str = typer.Option(None, "--policy", help="Default: the pairing's only policy."),
                secondary_host: str = typer.Option(None, "--secondary-host",
                                                   help="Default: the secondary host with the most free storage."),
                wait: bool = _wait_opts(True), timeout: float = _TIMEOUT) -> None:
    """Enable protection of a VM. The live fabric's readiness is checked first: a refusal
    prints the findings and exits 1. Prints the job id; --wait follows it."""
    body = {"vm": vm, "host": host, "policy": policy, "secondary_host": secondary_host}
    try:
        res = c.api.post("/items", json={k: v for k, v in body.items() if v is not None})
    except StandbyError as exc:
        findings = (getattr(exc, "details", None) or {}).get("findings")
        if findings:
            if c.json:
                print_json({"error": {"type": type(exc).__name__, "message": exc.message,
                                      "exit_code": exc.exit_code, "details": exc.details}})  # type: ignore[attr-defined]
            else:
                render_findings(findings, f"{vm} cannot be protected")
        raise
    job = res.get("job")
    if job and not c.json:
        console.print(f"protecting {escape(vm)}: job {job['id']}", highlight=False)
    _run_item_op(c, res, "protection enabled" if not wait else "protected", wait, timeout)


@api_command(top, "unprotect")
def unprotect_cmd(c: Ctx,
                  vm: str = typer.Argument(..., help="The VM or item id."),
                  delete_replica: bool = typer.Option(None, "--delete-replica/--keep-replica", show_default=False,
                                                      help="Delete the replica on the secondary (default: as the "
                                                           "policy says)."),
                  wait: bool = _wait_opts(True), timeout: float = _TIMEOUT) -> None:
    """Disable protection of a VM."""
    res = c.api.delete(f"/items/{seg(vm)}", params={"delete_replica": delete_replica})
    _run_item_op(c, res, "protection disabled", wait, timeout)


def _item_action(action: str, verb: str, doc: str) -> None:
    def cmd(c: Ctx, vm: str = typer.Argument(..., help="The VM or item id."),
            wait: bool = _wait_opts(False), timeout: float = _TIMEOUT) -> None:
        res = c.api.post(f"/items/{seg(vm)}/{action}")
        _run_item_op(c, res, verb, wait, timeout)

    cmd.__doc__ = doc
    cmd.__name__ = f"{action.replace('-', '_')}_cmd"
    api_command(top, action)(cmd)


_item_action("pause", "paused", "Pause replication of a protected VM.")
_item_action("resume", "resumed", "Resume replication of a paused VM.")
_item_action("replicate-now", "replication started", "Start a replication cycle now, outside the schedule.")
_item_action("resync", "resynchronization started",
             "Resynchronize a VM's replica (hash scan of every disk against the secondary).")


# ---------------------------------------------------------------------------- jobs

jobs_app = typer.Typer(help="Jobs: every operation, with its steps.")


def jobs_table(jobs: list[dict[str, Any]]) -> Table | str:
    rows = [[str(j.get("id")), escape(str(j.get("kind", ""))), escape(str(j.get("target", ""))),
             styled(j.get("state"), _STATE_STYLE), f"{j.get('progress', 0)}%", fmt_time(j.get("created_at")),
             fmt_duration(_elapsed(j)), escape(j.get("error") or j.get("message") or "")] for j in jobs]
    return _table("jobs", ["id", "kind", "target", "state", "progress", "created", "took", "message"], rows)


def _elapsed(job: dict[str, Any]) -> float | None:
    start = parse_time(job.get("started_at"))
    if start is None:
        return None
    end = parse_time(job.get("ended_at")) or dt.datetime.now(dt.timezone.utc)
    return (end - start).total_seconds()


def render_job(job: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("job", f"{job.get('id')} {escape(str(job.get('kind')))} {escape(str(job.get('target', '')))}")
    t.add_row("state", styled(job.get("state"), _STATE_STYLE) + f" ({job.get('progress', 0)}%)")
    if job.get("message"):
        t.add_row("message", escape(job["message"]))
    if job.get("error"):
        t.add_row("error", f"[red]{escape(job['error'])}[/]")
    t.add_row("created", f"{fmt_time(job.get('created_at'))}" + (f" by {escape(job['created_by'])}"
                                                                   if job.get("created_by") else ""))
    if job.get("started_at"):
        t.add_row("ran", f"{fmt_time(job.get('started_at'))} - {fmt_time(job.get('ended_at'))} "
                         f"({fmt_duration(_elapsed(job))})")
    if job.get("cancel_requested_at"):
        t.add_row("cancel", f"requested {fmt_time(job['cancel_requested_at'])}")
    console.print(t)
    steps = job.get("steps") or []
    if steps:
        rows = [[str(s.get("position", n)), escape(str(s.get("name"))), styled(s.get("state"), _STATE_STYLE),
                 f"{s.get('progress', 0)}%", fmt_duration(_elapsed(s)) if s.get("started_at") else "-",
                 escape(s.get("message") or "")] for n, s in enumerate(steps)]
        console.print(_table("steps", ["#", "step", "state", "progress", "took", "message"], rows))


@api_command(jobs_app, callback=True)
def jobs_list(c: Ctx, ctx: typer.Context,
              state: list[JobStateChoice] = typer.Option(None, "--state", help="Only jobs in this state (repeatable)."),
              kind: str = typer.Option(None, "--kind", help="Only jobs of this kind (protect, resync, ...)."),
              target: str = typer.Option(None, "--target", help='Only jobs on this target, e.g. "item:7".'),
              limit: int = typer.Option(50, "--limit", min=1, max=1000, help="At most this many, newest first.")
              ) -> None:
    """List jobs, newest first (`standby jobs show|watch|cancel ID` for one job)."""
    if ctx.invoked_subcommand is not None:
        return
    params: dict[str, Any] = {"kind": kind, "target": target, "limit": limit}
    if state:
        params["state"] = [s.value for s in state]
    jobs = c.api.get("/jobs", params=params)["items"]
    c.emit(jobs, lambda data: console.print(jobs_table(data)))


_JOB_ID = typer.Argument(..., min=1, help="The job's id.")


@api_command(jobs_app, "show")
def jobs_show(c: Ctx, job_id: int = _JOB_ID) -> None:
    """A job with its steps."""
    c.emit(c.api.get(f"/jobs/{job_id}"), render_job)


@api_command(jobs_app, "watch")
def jobs_watch(c: Ctx, job_id: int = _JOB_ID, timeout: float = _TIMEOUT) -> None:
    """Follow a job until it ends. Exit 0 when it succeeded, else the exit code of its error."""
    job = follow_job(c.api, c.api.get(f"/jobs/{job_id}"), timeout=timeout, quiet=c.json)
    _finish(c, job, job, render_job)


@api_command(jobs_app, "cancel")
def jobs_cancel(c: Ctx, job_id: int = _JOB_ID) -> None:
    """Cancel a job: a queued job at once, a running one at its next step."""
    job = c.api.post(f"/jobs/{job_id}/cancel")
    c.emit(job, lambda j: console.print(f"job {j.get('id')}: {j.get('state')}"
                                        + (" (cancel requested)" if j.get("state") not in JOB_TERMINAL else ""),
                                        highlight=False))


# ---------------------------------------------------------------------------- alerts

alerts_app = typer.Typer(help="Alerts: RPO breaches, lost heartbeats, resyncs required, low storage, failed jobs.")


@api_command(alerts_app, callback=True)
def alerts_list(c: Ctx, ctx: typer.Context,
                show_all: bool = typer.Option(False, "--all", help="Cleared alerts too."),
                kind: str = typer.Option(None, "--kind", help="Only alerts of this kind.")) -> None:
    """Open alerts (`standby alerts clear ID` to clear one by hand)."""
    if ctx.invoked_subcommand is not None:
        return
    alerts = c.api.get("/alerts", params={"open": None if show_all else True, "kind": kind})["items"]

    def render(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print("no open alerts" if not show_all else "no alerts")
            return
        rows = [[str(a.get("id")), styled(a.get("severity"), _SEVERITY_STYLE), escape(str(a.get("kind"))),
                 escape(str(a.get("subject"))), escape(str(a.get("message"))), fmt_time(a.get("raised_at")),
                 fmt_time(a.get("cleared_at")) if a.get("cleared_at") else "open"] for a in data]
        console.print(_table("alerts", ["id", "severity", "kind", "subject", "message", "raised", "cleared"], rows))

    c.emit(alerts, render)


@api_command(alerts_app, "clear")
def alerts_clear(c: Ctx, alert_id: int = typer.Argument(..., min=1, help="The alert's id.")) -> None:
    """Clear an alert (raised again if its condition persists)."""
    alert = c.api.post(f"/alerts/{alert_id}/clear")
    c.emit(alert, lambda a: console.print(f"alert {a.get('id')} ({escape(str(a.get('kind')))}) cleared",
                                          highlight=False))


# ---------------------------------------------------------------------------- policies

policy_app = typer.Typer(help="Replication policies.", no_args_is_help=True)


def parse_initial_at(value: str | None) -> str | None:
    """ISO 8601; a time without a zone is local time (what an operator types)."""
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadInput(f"--initial-at: {value!r} is not a time (ISO 8601, e.g. 2026-12-01T02:00 or "
                       "2026-12-01T02:00:00+00:00)") from None
    if t.tzinfo is None:
        t = t.astimezone()
    return t.isoformat()


def policy_body(*, description: str | None = None, copy_frequency: CopyFrequency | None = None,
                retention_hours: int | None = None, app_consistent_hours: int | None = None,
                compression: bool | None = None, authentication: Authentication | None = None,
                replication_port: int | None = None, initial: Initial | None = None, initial_at: str | None = None,
                export_path: str | None = None, import_path: str | None = None,
                delete_replica_on_disable: bool | None = None, rpo_alert_seconds: int | None = None,
                keep_all_points_minutes: int | None = None, creating: bool = False) -> dict[str, Any]:
    """The API body of a policy from the options given (None: not given, left out)."""
    if creating:  # what the store would refuse anyway, said in the options' terms
        if initial is Initial.SCHEDULED and not initial_at:
            raise BadInput("--initial scheduled needs --initial-at TIME")
        if initial is Initial.OFFLINE and not (export_path and import_path):
            raise BadInput("--initial offline needs --export-path and --import-path")
    body = {
        "description": description,
        "copy_frequency_seconds": FREQUENCY_SECONDS[copy_frequency.value] if copy_frequency else None,
        "recovery_point_retention_hours": retention_hours,
        "app_consistent_interval_hours": app_consistent_hours,
        "compression": compression,
        "authentication": authentication.value if authentication else None,
        "replication_port": replication_port,
        "initial_replication": initial.value if initial else None,
        "initial_replication_at": parse_initial_at(initial_at),
        "offline_export_path": export_path,
        "offline_import_path": import_path,
        "delete_replica_on_disable": delete_replica_on_disable,
        "rpo_alert_seconds": rpo_alert_seconds,
        "keep_all_points_minutes": keep_all_points_minutes,
    }
    return {k: v for k, v in body.items() if v is not None}


def render_policy(p: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("policy", escape(str(p.get("name"))) + (f" ({escape(p['description'])})" if p.get("description") else ""))
    t.add_row("copy frequency", fmt_frequency(p.get("copy_frequency_seconds")))
    t.add_row("retention", f"{p.get('recovery_point_retention_hours', 0)} h of recovery points"
              if p.get("recovery_point_retention_hours") else "latest recovery point only")
    t.add_row("keep all points", f"of the last {p['keep_all_points_minutes']} min"
              if p.get("keep_all_points_minutes") else "off (hourly points only)")
    t.add_row("app-consistent", f"every {p['app_consistent_interval_hours']} h"
              if p.get("app_consistent_interval_hours") else "off")
    t.add_row("compression", "on" if p.get("compression") else "off")
    t.add_row("authentication", f"{escape(str(p.get('authentication')))}, port {p.get('replication_port')}")
    initial = str(p.get("initial_replication"))
    if initial == "scheduled":
        initial += f" at {fmt_time(p.get('initial_replication_at'))}"
    elif initial == "offline":
        initial += f" (export {p.get('offline_export_path')}, import {p.get('offline_import_path')})"
    t.add_row("initial replication", escape(initial))
    t.add_row("on disable", "delete the replica" if p.get("delete_replica_on_disable") else "keep the replica")
    t.add_row("RPO alert", f"after {fmt_duration(p['rpo_alert_seconds'])}" if p.get("rpo_alert_seconds")
              else "default (3 x copy frequency; 60s when continuous)")
    if p.get("pairings"):
        t.add_row("pairings", ", ".join(str(x) for x in p["pairings"]))
    console.print(t)


_FREQ = typer.Option(None, "--copy-frequency", help="How often changes are sent: 30s, 5m, 15m or continuous.")
_RET = typer.Option(None, "--retention-hours", min=0, max=8760,
                    help="Keep recovery points for this many hours (0: only the latest).")
_APP = typer.Option(None, "--app-consistent-hours", min=0, max=8760,
                    help="An app-consistent point every N hours (0: off).")
_COMP = typer.Option(None, "--compression/--no-compression", show_default=False,
                     help="Compress replication data (default on).")
_AUTH = typer.Option(None, "--authentication", help="certificate (default) or kerberos.")
_PORT = typer.Option(None, "--replication-port", min=1, max=65535, help="Replication port (default 7443).")
_INIT = typer.Option(None, "--initial", help="Initial replication: now (default), scheduled or offline.")
_INIT_AT = typer.Option(None, "--initial-at", metavar="TIME",
                        help="With --initial scheduled: when (ISO 8601; no zone = local time).")
_EXPORT = typer.Option(None, "--export-path", help="With --initial offline: where the primary writes the seed.")
_IMPORT = typer.Option(None, "--import-path", help="With --initial offline: where the secondary reads it.")
_DEL = typer.Option(None, "--delete-replica-on-disable/--keep-replica-on-disable", show_default=False,
                    help="When protection is disabled, delete the replica (default: keep it).")
_RPO = typer.Option(None, "--rpo-alert-seconds", min=1,
                    help="Alert when the RPO exceeds this (default 3 x copy frequency; 60 s when continuous).")
_KEEP_ALL = typer.Option(None, "--keep-all-points-minutes", min=0, max=1440,
                         help="Also keep every recovery point of the last N minutes (Standby extension; "
                              "0, the default: hourly points only).")
_DESC = typer.Option(None, "--description", help="Free text.")


@api_command(policy_app, "create")
def policy_create(c: Ctx, name: str = typer.Argument(..., help="The policy's name."),
                  copy_frequency: CopyFrequency = _FREQ, retention_hours: int = _RET, app_consistent_hours: int = _APP,
                  compression: bool = _COMP, authentication: Authentication = _AUTH, replication_port: int = _PORT,
                  initial: Initial = _INIT, initial_at: str = _INIT_AT, export_path: str = _EXPORT,
                  import_path: str = _IMPORT, delete_replica_on_disable: bool = _DEL, rpo_alert_seconds: int = _RPO,
                  keep_all_points_minutes: int = _KEEP_ALL, description: str = _DESC) -> None:
    """Create a replication policy (defaults as the reference: every 5 minutes, latest point
    only, compression on, initial replication now, keep the replica on disable)."""
    body = policy_body(description=description, copy_frequency=copy_frequency, retention_hours=retention_hours,
                       app_consistent_hours=app_consistent_hours, compression=compression,
                       authentication=authentication, replication_port=replication_port, initial=initial,
                       initial_at=initial_at, export_path=export_path, import_path=import_path,
                       delete_replica_on_disable=delete_replica_on_disable, rpo_alert_seconds=rpo_alert_seconds,
                       keep_all_points_minutes=keep_all_points_minutes, creating=True)
    c.emit(c.api.post("/policies", json={"name": name, **body}), render_policy)


@api_command(policy_app, "update")
def policy_update(c: Ctx, name: str = typer.Argument(..., help="The policy's name."),
                  copy_frequency: CopyFrequency = _FREQ, retention_hours: int = _RET, app_consistent_hours: int = _APP,
                  compression: bool = _COMP, authentication: Authentication = _AUTH, replication_port: int = _PORT,
                  initial: Initial = _INIT, initial_at: str = _INIT_AT, export_path: str = _EXPORT,
                  import_path: str = _IMPORT, delete_replica_on_disable: bool = _DEL, rpo_alert_seconds: int = _RPO,
                  keep_all_points_minutes: int = _KEEP_ALL, description: str = _DESC) -> None:
    """Change the settings given; the others keep their value."""
    body = policy_body(description=description, copy_frequency=copy_frequency, retention_hours=retention_hours,
                       app_consistent_hours=app_consistent_hours, compression=compression,
                       authentication=authentication, replication_port=replication_port, initial=initial,
                       initial_at=initial_at, export_path=export_path, import_path=import_path,
                       delete_replica_on_disable=delete_replica_on_disable, rpo_alert_seconds=rpo_alert_seconds,
                       keep_all_points_minutes=keep_all_points_minutes)
    if not body:
        raise BadInput("policy update: give at least one setting to change (see --help)")
    c.emit(c.api.patch(f"/policies/{seg(name)}", json=body), render_policy)


@api_command(policy_app, "list")
def policy_list(c: Ctx) -> None:
    """Every policy."""
    policies = c.api.get("/policies")["items"]

    def render(data: list[dict[str, Any]]) -> None:
        rows = [[escape(str(p.get("name"))), fmt_frequency(p.get("copy_frequency_seconds")),
                 str(p.get("recovery_point_retention_hours", 0)), str(p.get("keep_all_points_minutes", 0)),
                 str(p.get("app_consistent_interval_hours", 0)),
                 "on" if p.get("compression") else "off", escape(str(p.get("initial_replication"))),
                 "delete" if p.get("delete_replica_on_disable") else "keep",
                 ", ".join(str(x) for x in p.get("pairings") or []) or "-"] for p in data]
        console.print(_table("policies", ["name", "frequency", "retention h", "keep all min", "app-consistent h",
                                          "compression", "initial", "on disable", "pairings"], rows))

    c.emit(policies, render)


@api_command(policy_app, "show")
def policy_show(c: Ctx, name: str = typer.Argument(..., help="The policy's name.")) -> None:
    """One policy's settings."""
    c.emit(c.api.get(f"/policies/{seg(name)}"), render_policy)


@api_command(policy_app, "delete")
def policy_delete(c: Ctx, name: str = typer.Argument(..., help="The policy's name.")) -> None:
    """Delete a policy no protected item uses."""
    c.api.delete(f"/policies/{seg(name)}")
    c.emit({"deleted": name}, lambda _: console.print(f"policy {escape(name)} deleted", highlight=False))


# ---------------------------------------------------------------------------- pairings


def pairings_table(pairings: list[dict[str, Any]]) -> Table | str:
    rows = [[str(p.get("id")), escape(str(p.get("primary_cloud"))), escape(str(p.get("secondary_cloud"))),
             escape(", ".join(p.get("policies") or [])) or "-", escape(p.get("bandwidth") or "unlimited"),
             fmt_time(p.get("created_at"))] for p in pairings]
    return _table("cloud pairings", ["id", "primary cloud", "secondary cloud", "policies", "bandwidth", "created"], rows)


_BANDWIDTH_HELP = ('Time windows and rates all replication of the pair shares, e.g. '
                   '"Mon-Fri 08:00-18:00=10MiB/s, otherwise unlimited" (agents\' local time).')


@api_command(top, "pair")
def pair_cmd(c: Ctx, primary: str = typer.Argument(..., metavar="PRIMARY_CLOUD", help="The primary cloud."),
             secondary: str = typer.Argument(..., metavar="SECONDARY_CLOUD", help="The secondary cloud."),
             policy: str = typer.Option(None, "--policy", help="Associate this policy with the pairing."),
             bandwidth: str = typer.Option(None, "--bandwidth", metavar="SCHEDULE", help=_BANDWIDTH_HELP)) -> None:
    """Pair a primary cloud with a secondary cloud."""
    body = {"primary_cloud": primary, "secondary_cloud": secondary, **({"policy": policy} if policy else {}),
            **({"bandwidth": bandwidth} if bandwidth else {})}
    c.emit(c.api.post("/pairings", json=body), lambda p: console.print(pairings_table([p])))


@api_command(top, "pair-bandwidth")
def pair_bandwidth_cmd(c: Ctx, pairing_id: int = typer.Argument(..., metavar="ID", min=1, help="The pairing's id."),
                       schedule: str = typer.Argument(..., metavar="SCHEDULE",
                                                      help=_BANDWIDTH_HELP + ' "unlimited" removes the limit.')) -> None:
    """Set the bandwidth schedule a pair's replication shares; agents apply it within a second."""
    text = "" if schedule.strip().lower() in ("unlimited", "none") else schedule
    c.emit(c.api.patch(f"/pairings/{pairing_id}", json={"bandwidth": text}),
           lambda p: console.print(pairings_table([p])))


@api_command(top, "pairings")
def pairings_cmd(c: Ctx) -> None:
    """Cloud pairings and their policies."""
    c.emit(c.api.get("/pairings")["items"],
           lambda data: console.print(pairings_table(data)))


@api_command(top, "unpair")
def unpair_cmd(c: Ctx, pairing_id: int = typer.Argument(..., metavar="ID", min=1, help="The pairing's id.")) -> None:
    """Remove a pairing that no protected item uses."""
    c.api.delete(f"/pairings/{pairing_id}")
    c.emit({"deleted": pairing_id}, lambda _: console.print(f"pairing {pairing_id} removed"))


# ---------------------------------------------------------------------------- networks

network_app = typer.Typer(help="VM networks and their mappings (primary -> secondary).", no_args_is_help=True)


@api_command(network_app, "map")
def network_map(c: Ctx, primary: str = typer.Argument(..., help="The primary VM network."),
                secondary: str = typer.Argument(..., help="The secondary VM network.")) -> None:
    """Map a primary VM network to a secondary one (failed-over VMs join it)."""
    m = c.api.post("/network-mappings", json={"primary": primary, "secondary": secondary})
    c.emit(m, lambda m: console.print(f"{escape(str(m.get('primary')))} -> {escape(str(m.get('secondary')))}",
                                      highlight=False))


@api_command(network_app, "list")
def network_list(c: Ctx) -> None:
    """VM networks with their mapping."""
    networks = c.api.get("/networks")["items"]
    mappings = c.api.get("/network-mappings")["items"]

    def render(_: Any) -> None:
        to = {m.get("primary"): m.get("secondary") for m in mappings}
        rows = [[escape(str(n.get("name"))), escape(str(n.get("site") or "-")), escape(str(to.get(n.get("name"), "-")))]
                for n in networks]
        console.print(_table("VM networks", ["network", "site", "maps to"], rows))

    c.emit({"networks": networks, "mappings": mappings}, render)


@api_command(network_app, "unmap")
def network_unmap(c: Ctx, primary: str = typer.Argument(..., help="The primary VM network.")) -> None:
    """Remove the mapping of a primary VM network."""
    c.api.delete(f"/network-mappings/{seg(primary)}")
    c.emit({"unmapped": primary}, lambda _: console.print(f"{escape(primary)} unmapped", highlight=False))


@api_command(network_app, "create")
def network_create(c: Ctx, name: str = typer.Argument(..., help="The network's name."),
                   site: str = typer.Option(..., "--site", help="The site it belongs to.")) -> None:
    """Declare a VM network of a site."""
    n = c.api.post("/networks", json={"name": name, "site": site})
    c.emit(n, lambda n: console.print(f"network {escape(str(n.get('name')))} (site {escape(str(n.get('site')))})",
                                      highlight=False))


# ---------------------------------------------------------------------------- inventory

inventory_app = typer.Typer(help="What the agents reported: clouds, hosts, VMs.", no_args_is_help=True)


@api_command(inventory_app, "clouds")
def inventory_clouds(c: Ctx) -> None:
    """Clouds with their management server, capabilities and hosts."""
    clouds = c.api.get("/clouds")["items"]
    rows = [[escape(str(x.get("name"))), escape(str(x.get("server"))), escape(", ".join(map(str, x.get("capabilities")
                                                                                           or []))),
             escape(", ".join(x.get("hosts") or [])), fmt_time(x.get("synced_at"))] for x in clouds]
    c.emit(clouds, lambda _: console.print(_table("clouds", ["cloud", "server", "capabilities", "hosts", "synced"],
                                                  rows)))


@api_command(inventory_app, "hosts")
def inventory_hosts(c: Ctx, cloud: str = typer.Option(None, "--cloud", help="Only this cloud's hosts.")) -> None:
    """Hypervisor hosts."""
    hosts = c.api.get("/hosts", params={"cloud": cloud})["items"]
    rows = [[escape(str(h.get("name"))), escape(str(h.get("server") or "-")), escape(str(h.get("host_group") or "-")),
             escape(str(h.get("platform"))), escape(str(h.get("replication_address") or "-")),
             fmt_bytes(h.get("storage_free_bytes")), fmt_time(h.get("synced_at"))] for h in hosts]
    c.emit(hosts, lambda _: console.print(_table("hosts", ["host", "server", "host group", "platform",
                                                           "replication address", "free storage", "synced"], rows)))


@api_command(inventory_app, "vms")
def inventory_vms(c: Ctx, cloud: str = typer.Option(None, "--cloud", help="Only VMs of this cloud."),
                  host: str = typer.Option(None, "--host", help="Only VMs of this host.")) -> None:
    """Virtual machines, with their disks and whether they are protected."""
    vms = sorted(c.api.get_all("/vms", params={"cloud": cloud, "host": host}),
                 key=lambda v: (str(v.get("host")), str(v.get("name"))))

    def disks(v: dict[str, Any]) -> str:
        d = v.get("disks") or {}
        total = sum(int(x.get("capacity_bytes") or x.get("size") or 0) for x in d.values() if isinstance(x, dict))
        return f"{len(d)}" + (f" ({fmt_bytes(total)})" if total else "")

    rows = [[escape(str(v.get("name"))), escape(str(v.get("host"))), escape(str(v.get("power_state") or "-")),
             disks(v), str(len(v.get("nics") or [])),
             f"item {v['protected_item_id']}" if v.get("protected_item_id") else "-",
             "[yellow]missing since " + fmt_time(v["missing_since"]) + "[/]" if v.get("missing_since") else ""]
            for v in vms]
    c.emit(vms, lambda _: console.print(_table("VMs", ["VM", "host", "power", "disks", "NICs", "protected", ""],
                                               rows)))


# ---------------------------------------------------------------------------- agents, keys, tokens

agents_app = typer.Typer(help="Registered agents (one per host).")


@api_command(agents_app, callback=True)
def agents_list(c: Ctx, ctx: typer.Context) -> None:
    """Registered agents with their heartbeat (`standby agents revoke NAME` to revoke one)."""
    if ctx.invoked_subcommand is not None:
        return
    agents = c.api.get("/agents")["items"]

    def render(data: list[dict[str, Any]]) -> None:
        rows = [[escape(str(a.get("name"))), escape(str(a.get("host_name"))), escape(str(a.get("address") or "-")),
                 escape(str(a.get("version") or "-")), styled(a.get("state"), {"active": "green", "revoked": "red"}),
                 ("[green]" if a.get("heartbeat_ok") else "[yellow]") + fmt_age(a.get("last_heartbeat_at")) + "[/]",
                 fmt_time(a.get("cert_not_after"))] for a in data]
        console.print(_table("agents", ["agent", "host", "address", "version", "state", "heartbeat",
                                        "certificate until"], rows))

    c.emit(agents, render)


@api_command(agents_app, "revoke")
def agents_revoke(c: Ctx, name: str = typer.Argument(..., help="The agent's name.")) -> None:
    """Revoke an agent: its certificate is no longer accepted."""
    a = c.api.delete(f"/agents/{seg(name)}")
    c.emit(a, lambda _: console.print(f"agent {escape(name)} revoked", highlight=False))


keys_app = typer.Typer(help="Registration keys: what an agent needs to register (valid 5 days at most).",
                       no_args_is_help=True)


@api_command(keys_app, "create")
def keys_create(c: Ctx, days: int = typer.Option(5, "--days", min=1, max=5, help="Validity in days (1 to 5)."),
                description: str = typer.Option("", "--description", help="What the key is for.")) -> None:
    """Create a registration key. The key is printed once: the control plane keeps only its hash."""
    k = c.api.post("/registration-keys", json={"description": description, "valid_days": days})

    def render(k: dict[str, Any]) -> None:
        console.print(k["key"], highlight=False, soft_wrap=True, markup=False)
        err_console.print(f"registration key {k.get('id')} (prefix {k.get('prefix')}), valid until "
                          f"{fmt_time(k.get('expires_at'))}; it is shown only now: "
                          "register an agent with it: standby agent register --key-file FILE ...", highlight=False,
                          soft_wrap=True)

    c.emit(k, render)


@api_command(keys_app, "list")
def keys_list(c: Ctx) -> None:
    """Registration keys (their prefixes: the keys themselves are not kept)."""
    keys = c.api.get("/registration-keys")["items"]
    rows = [[str(k.get("id")), escape(str(k.get("prefix"))), escape(k.get("description") or ""),
             fmt_time(k.get("created_at")), fmt_time(k.get("expires_at")),
             "[red]revoked[/]" if k.get("revoked_at") else "active", str(k.get("use_count", 0))] for k in keys]
    c.emit(keys, lambda _: console.print(_table("registration keys", ["id", "prefix", "description", "created",
                                                                      "expires", "state", "uses"], rows)))


@api_command(keys_app, "revoke")
def keys_revoke(c: Ctx, key_id: int = typer.Argument(..., metavar="ID", min=1, help="The key's id.")) -> None:
    """Revoke a registration key (agents registered with it stay registered)."""
    k = c.api.delete(f"/registration-keys/{key_id}")
    c.emit(k, lambda _: console.print(f"registration key {key_id} revoked"))


tokens_app = typer.Typer(help="API tokens for operators (read and write) and viewers (read only).",
                         no_args_is_help=True)


@api_command(tokens_app, "create")
def tokens_create(c: Ctx, name: str = typer.Argument(..., help="Who or what the token is for."),
                  role: Role = typer.Option(..., "--role", help="operator (everything) or viewer (read only)."),
                  expires_days: int = typer.Option(None, "--expires-days", min=1, max=3650,
                                                   help="Expire after this many days (default: never).")) -> None:
    """Create an API token. The token is printed once: the control plane keeps only its hash."""
    body: dict[str, Any] = {"name": name, "role": role.value}
    if expires_days is not None:
        body["expires_days"] = expires_days
    t = c.api.post("/tokens", json=body)

    def render(t: dict[str, Any]) -> None:
        console.print(t["token"], highlight=False, soft_wrap=True, markup=False)
        err_console.print(f"token {t.get('name')} ({t.get('role')}) is shown only now; use it as STANDBY_TOKEN "
                          "or put it in the file STANDBY_TOKEN_FILE names", highlight=False, soft_wrap=True)

    c.emit(t, render)


@api_command(tokens_app, "list")
def tokens_list(c: Ctx) -> None:
    """API tokens (names and prefixes: the tokens themselves are not kept)."""
    tokens = c.api.get("/tokens")["items"]
    rows = [[escape(str(t.get("name"))), escape(str(t.get("role"))), escape(str(t.get("prefix"))),
             fmt_time(t.get("created_at")), fmt_time(t.get("expires_at")) if t.get("expires_at") else "never",
             fmt_age(t.get("last_used_at")) if t.get("last_used_at") else "never",
             "[red]revoked[/]" if t.get("revoked_at") else "active"] for t in tokens]
    c.emit(tokens, lambda _: console.print(_table("API tokens", ["name", "role", "prefix", "created", "expires",
                                                                 "last used", "state"], rows)))


@api_command(tokens_app, "revoke")
def tokens_revoke(c: Ctx, name: str = typer.Argument(..., help="The token's name.")) -> None:
    """Revoke an API token."""
    t = c.api.delete(f"/tokens/{seg(name)}")
    c.emit(t, lambda _: console.print(f"token {escape(name)} revoked", highlight=False))


# ---------------------------------------------------------------------------- webhooks

webhooks_app = typer.Typer(help="Webhooks: where alerts are posted (signed with HMAC-SHA256).", no_args_is_help=True)


def read_secret_file(path: Path) -> str:
    try:
        secret = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BadInput(f"--secret-file {path}: {exc.strerror or exc}") from None
    if not secret:
        raise BadInput(f"--secret-file {path} is empty")
    return secret


@api_command(webhooks_app, "add")
def webhooks_add(c: Ctx, name: str = typer.Argument(..., help="The webhook's name."),
                 url: str = typer.Argument(..., metavar="URL", help="Where to POST alerts (http:// or https://)."),
                 secret_file: Path = typer.Option(None, "--secret-file",
                                                  help="File holding the HMAC secret (X-Standby-Signature)."),
                 kind: list[str] = typer.Option(None, "--kind", help="Only alerts of this kind (repeatable; "
                                                                    "default every kind)."),
                 min_severity: Severity = typer.Option(Severity.INFO, "--min-severity",
                                                       help="Only alerts at least this severe.")) -> None:
    """Post alerts (raised and cleared) to a URL."""
    if not url.startswith(("http://", "https://")):
        raise BadInput(f"URL {url!r}: must start with http:// or https://")
    body: dict[str, Any] = {"name": name, "url": url, "kinds": list(kind or []), "min_severity": min_severity.value}
    if secret_file is not None:
        body["secret"] = read_secret_file(secret_file)
    w = c.api.post("/webhooks", json=body)
    c.emit(w, lambda w: console.print(f"webhook {escape(str(w.get('name')))} -> {escape(str(w.get('url')))}",
                                      highlight=False))


@api_command(webhooks_app, "list")
def webhooks_list(c: Ctx) -> None:
    """Webhooks."""
    hooks = c.api.get("/webhooks")["items"]
    rows = [[escape(str(w.get("name"))), escape(str(w.get("url"))), "yes" if w.get("has_secret") else "no",
             escape(", ".join(w.get("kinds") or [])) or "every kind", escape(str(w.get("min_severity"))),
             "yes" if w.get("enabled", True) else "no"] for w in hooks]
    c.emit(hooks, lambda _: console.print(_table("webhooks", ["name", "URL", "signed", "kinds", "min severity",
                                                              "enabled"], rows)))


@api_command(webhooks_app, "remove")
def webhooks_remove(c: Ctx, name: str = typer.Argument(..., help="The webhook's name.")) -> None:
    """Stop posting alerts to a webhook."""
    c.api.delete(f"/webhooks/{seg(name)}")
    c.emit({"removed": name}, lambda _: console.print(f"webhook {escape(name)} removed", highlight=False))


# ---------------------------------------------------------------------------- registration


def register(app: typer.Typer) -> None:
    for info in top.registered_commands:
        app.registered_commands.append(info)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(alerts_app, name="alerts")
    app.add_typer(policy_app, name="policy")
    app.add_typer(network_app, name="network")
    app.add_typer(inventory_app, name="inventory")
    app.add_typer(agents_app, name="agents")
    app.add_typer(keys_app, name="keys")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(webhooks_app, name="webhooks")
