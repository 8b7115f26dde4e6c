"""Suite-wide pytest plugins (fixtures that several test directories share)."""

# tests/store_fixtures.py: store / store_url / empty_store_url over SQLite and a real PostgreSQL.
pytest_plugins = ["store_fixtures"]


# ---------------------------------------------------------------- no silent skips in CI
# Every skip in this suite says an environment is missing (no libvirt, PostgreSQL, root,
# namespaces, qemu-img). CI provides all of them, so there a skip means a broken set-up
# that would otherwise pass green: .ci/run sets STANDBY_NO_SKIPS=1 and every skip fails.
import os  # noqa: E402

import pytest  # noqa: E402

_NO_SKIPS = os.environ.get("STANDBY_NO_SKIPS") == "1"


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:  # type: ignore[type-arg]
    outcome = yield
    report = outcome.get_result()
    if _NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"skipped where CI must provide the environment (STANDBY_NO_SKIPS=1): "
                           f"{_skip_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if _NO_SKIPS and report.skipped:
        report.outcome = "failed"
        report.longrepr = (f"module skipped where CI must provide the environment (STANDBY_NO_SKIPS=1): "
                           f"{_skip_reason(report.longrepr)}")
