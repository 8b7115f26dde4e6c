"""The job runner on SQLite and PostgreSQL: steps persisted before they act, outcomes
(succeeded, failed + alert, errored + traceback, cancelled), and a control-plane restart
(a resumable job resumes at its first unfinished step; another ends errored)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.orm import Session

from standby.errors import Refused
from standby.orchestration.runner import JobHandler, JobRunner, Step, StepContext
from standby.orchestration.settings import ServerSettings
from standby.store import Store
from standby.store.models import Job
from standby.store.repo import alerts, inventory, jobs
from standby.store.states import JobState

TIMEOUT = 30.0


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path, runner_workers=2)


class Recorder:
    """Step functions whose effects are rows in the store (sites), counted per call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.seen_running: dict[str, str] = {}

    def make(self, name: str, body: Callable[[StepContext], None] | None = None) -> Step:
        def fn(ctx: StepContext) -> None:
            with self.lock:
                self.calls.append(name)
            # The step is persisted as running before it acts.
            with ctx.store.read() as s:
                job = jobs.get(s, ctx.job_id)
                self.seen_running[name] = job.steps[ctx.step_position].state
            if body is not None:
                body(ctx)
            with ctx.store.transaction() as s:
                inventory.ensure_site(s, f"{ctx.job_id}-{name}")  # idempotent effect

        return Step(name, fn)


def _site_exists(name: str) -> Callable[[Session], bool]:
    def pred(s: Session) -> bool:
        return any(site.name == name for site in inventory.list_sites(s))

    return pred


def _snapshot(job: Job) -> SimpleNamespace:
    """The job's fields as plain values (a read session's objects expire when it ends)."""
    fields = {c.name: getattr(job, c.name) for c in Job.__table__.columns}
    return SimpleNamespace(**fields, steps=[SimpleNamespace(state=st.state, name=st.name) for st in job.steps])


def _wait_job(store: Store, job_id: int, pred: Callable[[SimpleNamespace], bool],
              timeout: float = TIMEOUT) -> SimpleNamespace:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.read() as s:
            job = _snapshot(jobs.get(s, job_id))
        if pred(job):
            return job
        time.sleep(0.02)
    with store.read() as s:
        job = jobs.get(s, job_id)
        raise AssertionError(f"job {job_id} is {job.state} {[st.state for st in job.steps]}")


def _ended(store: Store, job_id: int) -> SimpleNamespace:
    return _wait_job(store, job_id, lambda j: j.state in {s.value for s in (
        JobState.SUCCEEDED, JobState.FAILED, JobState.ERRORED, JobState.CANCELLED)})


def _create(store: Store, runner: JobRunner, kind: str, **payload: object) -> int:
    with store.transaction() as s:
        return runner.create_job(s, kind=kind, target="test", payload=dict(payload)).id


def test_a_job_runs_its_steps_in_order_and_succeeds(store: Store, settings: ServerSettings) -> None:
    rec = Recorder()

    def report(ctx: StepContext) -> None:
        ctx.report(50, "half way")
        ctx.result["answer"] = 42

    runner = JobRunner(store, settings, {"demo": JobHandler([rec.make("one"), rec.make("two", report),
                                                             rec.make("three")])})
    job_id = _create(store, runner, "demo")  # submitted before start: dispatched by start()
    runner.start()
    try:
        job = _ended(store, job_id)
    finally:
        runner.stop()
    assert job.state == "succeeded" and job.progress == 100 and job.result == {"answer": 42}
    assert [st.state for st in job.steps] == ["succeeded"] * 3
    assert rec.calls == ["one", "two", "three"]
    assert rec.seen_running == {"one": "running", "two": "running", "three": "running"}
    assert job.resumable and job.attempts == 1 and job.runner == runner.name
    with store.read() as s:
        assert {f"{job_id}-{n}" for n in ("one", "two", "three")} <= {x.name for x in inventory.list_sites(s)}


def test_failed_errored_and_unknown_jobs(store: Store, settings: ServerSettings,
                                         caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()

    def refuse(ctx: StepContext) -> None:
        raise Refused("the secondary said no")

    def crash(ctx: StepContext) -> None:
        raise ZeroDivisionError("boom")

    ended: list[tuple[int, JobState, str]] = []
    runner = JobRunner(store, settings, {
        "refused": JobHandler([rec.make("one"), rec.make("two", refuse), rec.make("three")],
                              on_end=lambda ctx, st, err: ended.append((ctx.job_id, st, err))),
        "crash": JobHandler([rec.make("c1", crash)]),
    })
    runner.start()
    try:
        failed_id = _create(store, runner, "refused")
        job = _ended(store, failed_id)
        assert job.state == "failed" and job.error == "the secondary said no"
        assert [st.state for st in job.steps] == ["succeeded", "failed", "skipped"]
        assert "three" not in rec.calls
        assert ended == [(failed_id, JobState.FAILED, "the secondary said no")]
        with store.read() as s:
            alert = alerts.open_alert(s, "job_failed", f"job:{failed_id}")
            assert alert is not None and alert.severity == "warning" and "the secondary said no" in alert.message

        with caplog.at_level(logging.ERROR, logger="standby.runner"):
            crash_id = _create(store, runner, "crash")
            job = _ended(store, crash_id)
        assert job.state == "errored" and job.error == "ZeroDivisionError: boom"
        assert any(r.exc_info and isinstance(r.exc_info[1], ZeroDivisionError) for r in caplog.records)
        with store.read() as s:
            assert alerts.open_alert(s, "job_failed", f"job:{crash_id}") is not None

        # A job of a kind nobody handles (an older or newer control plane made it).
        with store.transaction() as s:
            odd = jobs.create(s, kind="mystery", steps=["x"], on_commit=runner.submit).id
        job = _ended(store, odd)
        assert job.state == "errored" and "no handler for job kind 'mystery'" in (job.error or "")
    finally:
        runner.stop()


def test_cancel_while_waiting(store: Store, settings: ServerSettings) -> None:
    rec = Recorder()

    def wait_forever(ctx: StepContext) -> None:
        ctx.wait_until(_site_exists("never"), timeout=TIMEOUT, poll=0.05, what="never")

    runner = JobRunner(store, settings, {"w": JobHandler([rec.make("wait", wait_forever), rec.make("after")])})
    runner.start()
    try:
        job_id = _create(store, runner, "w")
        _wait_job(store, job_id, lambda j: j.steps[0].state == "running")
        with store.transaction() as s:
            jobs.request_cancel(s, job_id)
        job = _ended(store, job_id)
    finally:
        runner.stop()
    assert job.state == "cancelled"
    assert [st.state for st in job.steps] == ["cancelled", "cancelled"]
    with store.read() as s:
        assert alerts.open_alert(s, "job_failed", f"job:{job_id}") is None


def test_wait_until_times_out_as_a_failure(store: Store, settings: ServerSettings) -> None:
    def short_wait(ctx: StepContext) -> None:
        ctx.wait_until(_site_exists("never"), timeout=0.3, poll=0.05, what="the site 'never'")

    runner = JobRunner(store, settings, {"w": JobHandler([Step("wait", short_wait)])})
    runner.start()
    try:
        job = _ended(store, _create(store, runner, "w"))
    finally:
        runner.stop()
    assert job.state == "failed" and job.error == "gave up waiting for the site 'never' after 0.3 s"


def test_a_restarted_control_plane_resumes_a_resumable_job_and_errors_the_others(
    store: Store, settings: ServerSettings
) -> None:
    rec = Recorder()

    def wait_go(ctx: StepContext) -> None:
        ctx.wait_until(_site_exists("go"), timeout=TIMEOUT, poll=0.05, what="go")

    def handlers() -> dict[str, JobHandler]:
        return {
            "resumable": JobHandler([rec.make("first"), rec.make("wait", wait_go), rec.make("last")]),
            "oneshot": JobHandler([rec.make("o-wait", wait_go), rec.make("o-last")], resumable=False),
        }

    first = JobRunner(store, settings, handlers(), name="cp-1")
    first.start()
    resumable_id = _create(store, first, "resumable")
    oneshot_id = _create(store, first, "oneshot")
    _wait_job(store, resumable_id, lambda j: j.steps[1].state == "running")
    _wait_job(store, oneshot_id, lambda j: j.steps[0].state == "running")
    first.stop()  # as if the control plane stopped: both jobs are left running
    first.stop()  # twice is fine
    with store.read() as s:
        assert jobs.get(s, resumable_id).state == "running"
        assert jobs.get(s, oneshot_id).state == "running"

    second = JobRunner(store, settings, handlers(), name="cp-2")
    dispatched = second.start()
    try:
        assert dispatched == [resumable_id]
        oneshot = _ended(store, oneshot_id)
        assert oneshot.state == "errored" and "cannot be resumed" in (oneshot.error or "")
        assert "(runner cp-1)" in (oneshot.error or "")
        _wait_job(store, resumable_id, lambda j: j.state == "running" and j.steps[1].state == "running")
        with store.transaction() as s:
            inventory.ensure_site(s, "go")
        job = _ended(store, resumable_id)
    finally:
        second.stop()
    assert job.state == "succeeded" and job.attempts == 2 and job.runner == "cp-2"
    assert [st.state for st in job.steps] == ["succeeded"] * 3
    # Resumed at its first unfinished step: "first" ran once, "wait" once per runner.
    assert rec.calls.count("first") == 1 and rec.calls.count("wait") == 2 and rec.calls.count("last") == 1
    assert "o-last" not in rec.calls


def test_a_job_is_not_run_twice(store: Store, settings: ServerSettings) -> None:
    rec = Recorder()
    gate = threading.Event()

    def slow(ctx: StepContext) -> None:
        gate.wait(TIMEOUT)

    runner = JobRunner(store, settings, {"slow": JobHandler([rec.make("s", slow)])})
    runner.start()
    try:
        job_id = _create(store, runner, "slow")
        _wait_job(store, job_id, lambda j: j.state == "running")
        runner.submit(job_id)  # a duplicate dispatch while it runs
        gate.set()
        _ended(store, job_id)
        runner.submit(job_id)  # and one after it ended: not queued, left alone
        time.sleep(0.2)
    finally:
        runner.stop()
    assert rec.calls.count("s") == 1
