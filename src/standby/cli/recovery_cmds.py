"""Recovery from the command line (docs/recovery.md): clients of the control plane's
recovery routes, with the conventions of `control_cmds` (Ctx, --json, jobs followed with a
progress bar per step, errors as one line and an exit code).

    standby test-failover VM | test-failover-cleanup VM | failover VM --type planned|unplanned
    standby commit VM | cancel-failover VM | reverse-replicate VM | failback VM
    standby recovery-points VM
    standby plan create|list|show|delete|failover      standby jobs confirm JOB_ID STEP

(`standby points` is the local replica store's group, hence `recovery-points` for an
item's points as the secondary's agent lists them.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from standby.cli import control_cmds as cc
from standby.cli.control_cmds import Ctx, api_command, console, err_console, seg
from standby.client import ApiClient
from standby.errors import BadInput, RemoteError

LATEST = "latest"
_PLAN_STEP_STYLE = {"done": "green", "failed": "bold red", "running": "cyan", "waiting": "bold yellow",
                    "pending": "dim"}
_PLAN_STEP_ENDED = frozenset({"done", "failed"})


class FailoverType(str, Enum):
    PLANNED = "planned"
    UNPLANNED = "unplanned"


class PlanFailoverType(str, Enum):
    TEST = "test"
    PLANNED = "planned"
    UNPLANNED = "unplanned"


top = typer.Typer()  # a holder for the top-level commands, copied onto the main app in register()

_VM = typer.Argument(..., help="The VM (or the protected item's id).")
_POINT = typer.Option(None, "--point", metavar="P",
                      help="latest (default), latest_processed, latest_app_consistent or a point id "
                           "(standby recovery-points VM).")


def _wait() -> Any:
    return cc._wait_opts(True)


def _item_op(c: Ctx, path: str, body: dict[str, Any] | None, verb: str, wait: bool, timeout: float | None) -> None:
    res = c.api.post(path, json=body)
    job = res.get("job")
    if job and not c.json:
        console.print(f"{escape(str((res.get('item') or {}).get('vm', '?')))}: {verb}: job {job['id']}",
                      highlight=False)
    cc._run_item_op(c, res, verb, wait, timeout)


# ---------------------------------------------------------------------------- one VM


def test_network_body(network: str) -> dict[str, Any]:
    """--network isolated|none|NAME -> the API's {mode, name?}."""
    value = network.strip()
    if not value:
        raise BadInput("--network: give isolated, none or the name of an existing network")
    if value in ("isolated", "none"):
        return {"mode": value}
    return {"mode": "existing", "name": value}


test_network_body.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@api_command(top, "test-failover")
def test_failover_cmd(c: Ctx, vm: str = _VM, point: str = _POINT,
                      network: str = typer.Option("isolated", "--network", metavar="isolated|none|NAME",
                                                  help="isolated: a network made for the test (no uplink); none: no "
                                                       "NIC connected; NAME: an existing network on the secondary."),
                      wait: bool = _wait(), timeout: float = cc._TIMEOUT) -> None:
    """Test failover: start a recovery point of the VM on the secondary as a test VM
    (copy-on-write; replication and the source are not disturbed). Clean it up with
    `standby test-failover-cleanup VM`."""
    body = {"point": point or LATEST, "network": test_network_body(network)}
    _item_op(c, f"/items/{seg(vm)}/test-failover", body, "test failover", wait, timeout)


@api_command(top, "test-failover-cleanup")
def test_failover_cleanup_cmd(c: Ctx, vm: str = _VM,
                              notes: str = typer.Option("", "--notes", metavar="TEXT",
                                                        help="What the test showed (kept with the item)."),
                              wait: bool = _wait(), timeout: float = cc._TIMEOUT) -> None:
    """Remove a test failover's VM, network and overlay, and record the notes."""
    if len(notes) > 4000:
        raise BadInput("--notes: at most 4000 characters")
    _item_op(c, f"/items/{seg(vm)}/test-failover/cleanup", {"notes": notes}, "test failover cleaned up", wait,
             timeout)


def failover_body(type_: FailoverType, point: str | None, shutdown: bool) -> dict[str, Any]:
    """The API body; what a planned failover cannot take is refused here, in the options' terms."""
    if type_ is FailoverType.PLANNED:
        if point not in (None, LATEST):
            raise BadInput("--point: a planned failover takes the point of its final sync (zero data loss); "
                           "choose a point with --type unplanned")
        if not shutdown:
            raise BadInput("--no-shutdown: a planned failover always shuts the source down first; "
                           "use --type unplanned")
        return {"type": "planned"}
    return {"type": "unplanned", "point": point or LATEST, "shutdown_source": shutdown}


@api_command(top, "failover")
def failover_cmd(c: Ctx, vm: str = _VM,
                 type_: FailoverType = typer.Option(..., "--type", help="planned (zero data loss; the source is shut "
                                                                        "down and synced) or unplanned."),
                 point: str = _POINT,
                 shutdown: bool = typer.Option(True, "--shutdown/--no-shutdown",
                                               help="Unplanned: try to shut the source down and sync its last "
                                                    "changes first (goes on if that fails)."),
                 wait: bool = _wait(), timeout: float = cc._TIMEOUT) -> None:
    """Fail a VM over to the secondary. Commit it afterwards (`standby commit VM`) or
    cancel it (`standby cancel-failover VM`)."""
    body = failover_body(type_, point, shutdown)
    _item_op(c, f"/items/{seg(vm)}/failover", body, f"{type_.value} failover", wait, timeout)


def _action(action: str, verb: str, doc: str) -> None:
    def cmd(c: Ctx, vm: str = _VM, wait: bool = _wait(), timeout: float = cc._TIMEOUT) -> None:
        _item_op(c, f"/items/{seg(vm)}/{action}", None, verb, wait, timeout)

    cmd.__doc__ = doc
    cmd.__name__ = f"{action.replace('-', '_')}_cmd"
    api_command(top, action)(cmd)


_action("commit", "failover committed", "Commit a failover: the replica stays; older recovery points may go.")
_action("cancel-failover", "failover cancelled",
        "Cancel an uncommitted failover: the replica is stopped and removed, the source started again.")
_action("reverse-replicate", "reverse replication",
        "Replicate the failed-over VM back to the old primary (only the blocks that differ move).")
_action("failback", "failback", "Fail back to the primary: reverse sync, planned failover back, replicate forward.")


def points_table(res: dict[str, Any]) -> Any:
    rows = []
    for disk, points in sorted((res.get("points") or {}).items()):
        for p in sorted(points, key=lambda p: str(p.get("created_at") or ""), reverse=True):
            rows.append([escape(str(disk)), escape(str(p.get("id"))), cc.fmt_time(p.get("created_at")),
                         escape(str(p.get("consistency") or "-")), escape(str(p.get("kind") or "-")),
                         cc.fmt_bytes(p.get("bytes_changed")), "yes" if p.get("pinned") else ""])
    return cc._table(f"recovery points on {res.get('secondary_host', '?')}",
                     ["disk", "point", "created", "consistency", "kind", "changed", "pinned"], rows)


@api_command(top, "recovery-points")
def recovery_points_cmd(c: Ctx, vm: str = _VM,
                        wait_seconds: float = typer.Option(30.0, "--agent-timeout", min=1.0, max=120.0,
                                                           help="Seconds to wait for the secondary's agent.")) -> None:
    """A protected VM's recovery points, newest first, as the secondary's agent lists them."""
    res = c.api.get(f"/items/{seg(vm)}/points", params={"timeout": wait_seconds})
    c.emit(res, lambda r: console.print(points_table(r)))


# ---------------------------------------------------------------------------- recovery plans

plan_app = typer.Typer(help="Recovery plans: ordered groups of VMs, scripts and manual actions.",
                       no_args_is_help=True)


def read_plan_file(path: Path) -> dict[str, Any]:
    """A plan document from a .json file, or YAML (.yaml, .yml, or anything else)."""
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"plan file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # only this command needs it

            data = yaml.safe_load(text)
    except ValueError as exc:
        raise BadInput(f"plan file {path}: not JSON: {exc}") from None
    except Exception as exc:  # yaml.YAMLError, without importing yaml at start-up
        raise BadInput(f"plan file {path}: not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise BadInput(f"plan file {path}: a plan is a mapping (name, groups, ...)")
    return data


def _groups(plan: dict[str, Any]) -> list[dict[str, Any]]:
    groups = (plan.get("document") or {}).get("groups") or []
    return [g for g in groups if isinstance(g, dict)]


def plans_table(plans: list[dict[str, Any]]) -> Any:
    rows = [[escape(str(p.get("name"))), str(len(_groups(p))), str(sum(len(g.get("vms") or []) for g in _groups(p))),
             escape(str((p.get("document") or {}).get("description") or "")), cc.fmt_time(p.get("updated_at"))]
            for p in plans]
    return cc._table("recovery plans", ["plan", "groups", "VMs", "description", "updated"], rows)


def _script_text(s: dict[str, Any]) -> str:
    args = " ".join(str(a) for a in s.get("args") or [])
    return f"{s.get('path')}{' ' + args if args else ''} ({s.get('timeout_seconds', 600):g} s)"


def render_plan(plan: dict[str, Any]) -> None:
    doc = plan.get("document") or {}
    console.print(f"[bold]recovery plan {escape(str(plan.get('name')))}[/]"
                  + (f": {escape(str(doc['description']))}" if doc.get("description") else ""), highlight=False)
    rows = []
    for n, g in enumerate(_groups(plan), 1):
        actions = [f"{m.get('text')} ({', '.join(m.get('failover_types') or ['all'])})"
                   for m in g.get("manual_actions") or []]
        rows.append([str(n), escape(str(g.get("name") or f"group {n}")), escape(", ".join(g.get("vms") or [])),
                     escape("\n".join(_script_text(s) for s in g.get("pre") or [])) or "-",
                     escape("\n".join(_script_text(s) for s in g.get("post") or [])) or "-",
                     escape("\n".join(actions)) or "-"])
    console.print(cc._table("groups (in order; the VMs of a group in parallel)",
                            ["#", "group", "VMs", "pre scripts", "post scripts", "manual actions"], rows))


@api_command(plan_app, "create")
def plan_create(c: Ctx, file: Path = typer.Argument(..., metavar="FILE", help="The plan, YAML or JSON."),
                replace: bool = typer.Option(False, "--replace", help="Replace a plan of the same name.")) -> None:
    """Store a recovery plan (validated: every problem is listed by field)."""
    document = read_plan_file(file)
    plan = c.api.post("/plans", json=document, params={"replace": True} if replace else None)
    c.emit(plan, render_plan)


@api_command(plan_app, "list")
def plan_list(c: Ctx) -> None:
    """Every recovery plan."""
    c.emit(c.api.get("/plans")["items"], lambda data: console.print(plans_table(data)))


@api_command(plan_app, "show")
def plan_show(c: Ctx, name: str = typer.Argument(..., help="The plan's name.")) -> None:
    """A plan's groups, VMs, scripts and manual actions."""
    c.emit(c.api.get(f"/plans/{seg(name)}"), render_plan)


@api_command(plan_app, "delete")
def plan_delete(c: Ctx, name: str = typer.Argument(..., help="The plan's name.")) -> None:
    """Delete a plan (refused while a run of it goes on)."""
    c.api.delete(f"/plans/{seg(name)}")
    c.emit({"deleted": name}, lambda _: console.print(f"recovery plan {escape(name)} deleted", highlight=False))


# -- following a plan's job: one line or bar per plan step, and the manual actions


def plan_steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan steps of a plan job with their status: from the job's result once it ended,
    else expanded from its payload the way the control plane does (`domain.plans`)."""
    result = job.get("result") if isinstance(job.get("result"), dict) else {}
    if result.get("steps"):
        return [dict(s) for s in result["steps"]]
    payload = job.get("payload") or {}
    if not payload.get("document"):
        return []
    from standby.domain import plans as plan_rules  # pure; pydantic only for the commands that need it

    steps = plan_rules.expand(plan_rules.load_plan(payload["document"]), payload.get("type", "test"),
                              skip=payload.get("skip") or [])
    statuses = payload.get("statuses") or []
    info = payload.get("info") or {}
    out = []
    for st in steps:
        status = statuses[st.number - 1] if st.number - 1 < len(statuses) else "pending"
        out.append({**st.as_dict(), "status": status, **(info.get(str(st.number)) or {})})
    return out


def manual_action_notice(job_id: Any, step: dict[str, Any]) -> str:
    return (f"step {step.get('number')} waits for you: {step.get('text')}\n"
            f"  when it is done, confirm it: standby jobs confirm {job_id} {step.get('number')}")


def plan_step_events(prev: list[dict[str, Any]] | None, cur: list[dict[str, Any]]) -> list[str]:
    before = {s.get("number"): s.get("status") for s in prev or []}
    lines = []
    for s in cur:
        status = s.get("status")
        if before.get(s.get("number"), "pending") != status:
            err = f": {s['error']}" if status == "failed" and s.get("error") else ""
            lines.append(f"  step {s.get('number')}. {s.get('label')}: {status}{err}")
    return lines


class _PlanBars:
    """A bar per plan step (steps run one at a time: a bar fills when its step ends)."""

    def __init__(self, out: Console) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
                                 TimeElapsedColumn(), console=out)
        self.bars: dict[Any, TaskID] = {}

    def __enter__(self) -> _PlanBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def update(self, steps: list[dict[str, Any]]) -> None:
        p = self.progress
        for s in steps:
            key = s.get("number")
            status = str(s.get("status"))
            if key not in self.bars:
                self.bars[key] = p.add_task(f"{key}. {escape(str(s.get('label')))}", total=100, state="",
                                            start=status != "pending")
            elif status != "pending":
                p.start_task(self.bars[key])
            p.update(self.bars[key], completed=100 if status in _PLAN_STEP_ENDED else 0,
                     state=cc.styled(status, _PLAN_STEP_STYLE))
            if status in _PLAN_STEP_ENDED:
                p.stop_task(self.bars[key])


def follow_plan_job(api: ApiClient, job: dict[str, Any], *, interval: float | None = None,
                    timeout: float | None = None, quiet: bool = False, out: Console | None = None) -> dict[str, Any]:
    """Poll a plan's job until it ends: a bar per plan step on a terminal, plain lines
    otherwise (none when quiet). A manual action the plan waits on is always announced
    (on stderr), with the command that confirms it. Returns the job as it ended."""
    out = out or err_console
    deadline = None if timeout is None else time.monotonic() + timeout
    job_id = job["id"]
    announced: set[Any] = set()

    def announce(steps: list[dict[str, Any]]) -> None:
        for s in steps:
            if s.get("status") == "waiting" and s.get("number") not in announced:
                announced.add(s.get("number"))
                out.print(manual_action_notice(job_id, s), highlight=False, soft_wrap=True, markup=False)

    def poll(show: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> dict[str, Any]:
        cur = job
        while True:
            steps = plan_steps(cur)
            show(cur, steps)
            announce(steps)
            if cur.get("state") in cc.JOB_TERMINAL:
                return cur
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteError(f"job {job_id} has not ended after {timeout:g} s (state {cur.get('state')}); "
                                  f"it goes on: standby jobs watch {job_id}")
            time.sleep(cc.POLL_SECONDS if interval is None else interval)
            cur = api.get(f"/jobs/{job_id}")

    try:
        if quiet:
            return poll(lambda _j, _s: None)
        if out.is_terminal:
            with _PlanBars(out) as bars:
                return poll(lambda _j, steps: bars.update(steps))
        last: dict[str, Any] = {"steps": None, "state": None}

        def lines(j: dict[str, Any], steps: list[dict[str, Any]]) -> None:
            for line in plan_step_events(last["steps"], steps):
                out.print(line, highlight=False, soft_wrap=True, markup=False)
            if j.get("state") != last["state"]:
                out.print(cc.job_line(j) + (f": {j['error']}" if j.get("error") else ""), highlight=False,
                          soft_wrap=True, markup=False)
            last.update(steps=steps, state=j.get("state"))

        return poll(lines)
    except KeyboardInterrupt:
        err_console.print(f"stopped watching; job {job_id} goes on (standby jobs watch {job_id})")
        raise


def render_plan_run(job: dict[str, Any]) -> None:
    steps = plan_steps(job)
    result = job.get("result") if isinstance(job.get("result"), dict) else {}
    head = f"job {job.get('id')} {job.get('target', '')}: {job.get('state')}"
    if result.get("message"):
        head += f" ({result['message']})"
    console.print(escape(head), highlight=False)
    rows = [[str(s.get("number")), escape(str(s.get("label"))), cc.styled(s.get("status"), _PLAN_STEP_STYLE),
             cc.fmt_duration(s.get("seconds")), escape(str(s.get("error") or ""))] for s in steps]
    console.print(cc._table("plan steps", ["#", "step", "status", "took", "error"], rows))


@api_command(plan_app, "failover")
def plan_failover(c: Ctx, name: str = typer.Argument(..., help="The plan's name."),
                  type_: PlanFailoverType = typer.Option(..., "--type", help="test, planned or unplanned."),
                  point: str = _POINT,
                  dry_run: bool = typer.Option(False, "--dry-run", help="Print the steps; nothing acts."),
                  wait: bool = _wait(), timeout: float = cc._TIMEOUT) -> None:
    """Fail a plan's VMs over, group after group. Follows the job; when the plan waits on a
    manual action it prints the action and the command that confirms it."""
    if type_ is PlanFailoverType.PLANNED and point not in (None, LATEST):
        raise BadInput("--point: a planned failover takes the point of each VM's final sync (zero data loss)")
    body: dict[str, Any] = {"type": type_.value, "dry_run": dry_run}
    if point is not None:
        body["point"] = point
    res = c.api.post(f"/plans/{seg(name)}/failover", json=body)
    if dry_run:
        c.emit(res, lambda r: console.print(str(r.get("text", "")).rstrip("\n"), highlight=False, markup=False,
                                            soft_wrap=True))
        return
    job = res["job"]
    if not c.json:
        console.print(f"recovery plan {escape(name)}: {type_.value} failover: job {job['id']}", highlight=False)
    if wait:
        job = follow_plan_job(c.api, job, timeout=timeout, quiet=c.json)
    cc._finish(c, job, job, render_plan_run if wait else lambda j: console.print(cc.job_line(j), highlight=False))


# ---------------------------------------------------------------------------- jobs confirm


@api_command(cc.jobs_app, "confirm")
def jobs_confirm(c: Ctx, job_id: int = typer.Argument(..., min=1, help="The recovery plan's job."),
                 step: int = typer.Argument(..., min=1, help="The manual action's step number.")) -> None:
    """Confirm a manual action a recovery plan waits on; the plan goes on."""
    res = c.api.post(f"/jobs/{job_id}/confirm", json={"step": step})
    c.emit(res, lambda r: console.print(f"job {job_id}: step {step} confirmed by {r.get('confirmed_by') or '?'}",
                                        highlight=False))


# ---------------------------------------------------------------------------- registration


def register(app: typer.Typer) -> None:
    # `jobs confirm` joined control_cmds' `jobs` group when this module was imported.
    for info in top.registered_commands:
        app.registered_commands.append(info)
    app.add_typer(plan_app, name="plan")
