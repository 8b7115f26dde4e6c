"""The role a control plane shows: /health reads `RoleKeeper.last_view` (no database per
request), so taking the active role must update it at once, never "active" beside the
previous holder's epoch (a health check in that moment saw epoch 2 where 3 was due)."""

from __future__ import annotations

from pathlib import Path

from standby.orchestration.role import Role, RoleKeeper
from standby.store.db import open_store


def test_taking_over_shows_the_new_epoch_at_once(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        b = RoleKeeper(store, name="cp-b", url="https://cp-b:8443")
        assert b.try_activate()
        b.view()
        assert b.last_view is not None and b.last_view.epoch == 1
        b.release()
        c = RoleKeeper(store, name="cp-c", url="https://cp-c:8443")
        assert c.try_activate()  # cp-b held the role last: a take-over, a new epoch
        v = c.last_view  # no view() call in between: what /health would answer now
        assert v is not None and v.role is Role.ACTIVE
        assert (v.epoch, v.active_name, v.active_url) == (2, "cp-c", "https://cp-c:8443")
        assert c.view().epoch == 2  # and the store agrees
        c.release()
    finally:
        store.close()
