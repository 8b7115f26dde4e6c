"""The control plane's store on SQLite and on a real PostgreSQL: migrations, every
aggregate's repository, the job lifecycle, registration key expiry.

Each test using `store`, `store_url` or `empty_store_url` runs once per backend
(tests/store_fixtures.py starts the PostgreSQL); `-m "not postgresql"` keeps SQLite only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from migration_helpers import insert_legacy_policy  # noqa: E402
from standby.errors import BadInput, Conflict, NotFound, Refused
from standby.store import Store, StoreError, open_store
from standby.store.base import Base
from standby.store.db import (
    alembic_config,
    create_store_engine,
    current_revision,
    head_revision,
    migrations_dir,
    upgrade,
)
from standby.store.models import Agent, ApiToken, Job, Policy, RegistrationKey
from standby.store.repo import agents, alerts, inventory, items, jobs, policies, tokens
from standby.store.repo.inventory import HostReport, VmReport
from standby.store.states import JOB_TERMINAL, JOB_TRANSITIONS, JobState, StepState

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---------------------------------------------------------------- migrations


def test_migrations_build_an_empty_database_and_match_the_models(empty_store_url: str) -> None:
    store = open_store(empty_store_url)
    try:
        assert current_revision(store.engine) == head_revision()
        tables = set(inspect(store.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        with store.engine.connect() as conn:
            # `alembic check`: autogenerate finds nothing to add, drop or alter.
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            command.check(alembic_config(conn))
    finally:
        store.close()
    # Opening again is a no-op upgrade.
    open_store(empty_store_url).close()


def test_downgrade_to_base_and_upgrade_again(empty_store_url: str) -> None:
    engine = create_store_engine(empty_store_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_a_schema_from_a_newer_standby_is_refused(empty_store_url: str) -> None:
    open_store(empty_store_url).close()
    engine = create_store_engine(empty_store_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="newer Standby"):
        open_store(empty_store_url)


_REBUILD_JOBS = """
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # On SQLite this rebuilds the table (copy, drop the old one, rename).
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("message", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    pass
"""


def test_a_table_rebuilding_migration_keeps_the_rows_that_refer_to_it(empty_store_url: str, tmp_path: Any) -> None:
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    # A migration on top of the current head (its revision id sorts after every real one).
    (scripts / "versions" / "9999_rebuild_jobs.py").write_text(_REBUILD_JOBS.replace("{head}", head_revision()))
    store = open_store(empty_store_url)
    try:
        with store.transaction() as s:
            job_id = jobs.create(s, kind="k", steps=["a", "b"]).id
    finally:
        store.close()
    engine = create_store_engine(empty_store_url)
    try:
        upgrade(engine, script_location=str(scripts))
        assert current_revision(engine) == "9999"
        with engine.connect() as conn:
            steps = conn.execute(text("SELECT name FROM job_steps WHERE job_id = :j ORDER BY position"), {"j": job_id})
            assert [r[0] for r in steps] == ["a", "b"]  # not cascaded away by the rebuild
            if conn.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on
    finally:
        engine.dispose()


def test_migration_0004_gives_existing_policies_keep_all_points_0_and_checks_it(empty_store_url: str) -> None:
    engine = create_store_engine(empty_store_url)
    try:
        upgrade(engine, "0003")
        with engine.begin() as conn:
            insert_legacy_policy(conn, T0, retention_hours=24)
        upgrade(engine, "0004")
        assert current_revision(engine) == "0004"
        with engine.connect() as conn:
            row = conn.execute(text("SELECT recovery_point_retention_hours, keep_all_points_minutes FROM policies"))
            assert row.one() == (24, 0)
        for bad in (-1, 1441):  # the database's check, bypassing the repository
            with pytest.raises(IntegrityError, match="ck_policies_keep_all_points"), engine.begin() as conn:
                conn.execute(text("UPDATE policies SET keep_all_points_minutes = :v"), {"v": bad})
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0003")
        assert "keep_all_points_minutes" not in {c["name"] for c in inspect(engine).get_columns("policies")}
        upgrade(engine)
    finally:
        engine.dispose()
    store = open_store(empty_store_url)
    try:
        with store.read() as s:
            assert policies.get_policy(s, "old").keep_all_points_minutes == 0
    finally:
        store.close()


def test_constraint_and_index_names_fit_postgresql() -> None:
    names = []
    for table in Base.metadata.tables.values():
        names += [c.name for c in table.constraints] + [i.name for i in table.indexes]
    assert all(isinstance(n, str) for n in names)
    too_long = [n for n in names if len(str(n)) > 63]
    assert too_long == []


def test_unsupported_or_unreachable_stores_are_refused(tmp_path: Any) -> None:
    with pytest.raises(StoreError, match="SQLite or PostgreSQL"):
        create_store_engine("mysql://x@localhost/db")
    with pytest.raises(StoreError, match="cannot open the store"):
        open_store(f"postgresql+psycopg://standby@/standby?host={tmp_path}/no-server")


def test_sqlite_pragmas(tmp_path: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()


# ---------------------------------------------------------------- transactions and types


def test_datetimes_come_back_aware_utc_and_naive_ones_are_refused(store: Store) -> None:
    plus2 = datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    with store.transaction() as s:
        job = jobs.create(s, kind="k", now=plus2)
        job_id = job.id
    with store.read() as s:
        created = jobs.get(s, job_id).created_at
        assert created == T0 and created.tzinfo is not None and created.utcoffset() == timedelta(0)
    with pytest.raises(Exception, match="naive datetime"):
        with store.transaction() as s:
            jobs.create(s, kind="k", now=datetime(2026, 1, 1))


def test_a_failed_transaction_leaves_nothing_and_integrity_errors_are_conflicts(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.transaction() as s:
            inventory.ensure_site(s, "a")
            raise RuntimeError("boom")
    with store.read() as s:
        assert inventory.list_sites(s) == []
    with store.transaction() as s:
        tokens.create_token(s, "t", role="viewer")
    with pytest.raises(Conflict, match="refused the change"):
        with store.transaction() as s:
            tokens.create_token(s, "t", role="viewer")


def test_database_checks_back_up_the_repository(store: Store) -> None:
    # Bypass the repository: the CHECK constraints still refuse nonsense.
    with pytest.raises(Conflict):
        with store.transaction() as s:
            s.add(Policy(name="bad", copy_frequency_seconds=60))
    with pytest.raises(Conflict):
        with store.transaction() as s:
            s.add(Policy(name="bad", keep_all_points_minutes=1441))
    with pytest.raises(Conflict):
        with store.transaction() as s:
            s.add(Job(kind="k", state="paused"))
    with pytest.raises(Conflict):
        with store.transaction() as s:
            s.add(ApiToken(name="x", prefix="p", token_hash="h", role="admin"))


# ---------------------------------------------------------------- inventory


def _fabric(s: Any) -> None:
    inventory.ensure_server(s, "vmm-a", site="site-a", platform="kvm", version="0.1.0")
    inventory.ensure_server(s, "vmm-b", site="site-b", platform="kvm", version="0.1.0")
    inventory.ensure_cloud(s, "gold", server="vmm-a", capabilities=["kvm"])
    inventory.ensure_cloud(s, "gold-dr", server="vmm-b", capabilities=["kvm"])


def _vm(name: str, uuid: str | None = None) -> VmReport:
    return VmReport(name=name, uuid=uuid, power_state="running", disks={"vda": {"format": "qcow2", "size_gib": 1}})


def test_inventory_sync_per_cloud(store: Store) -> None:
    with store.transaction() as s:
        _fabric(s)
        r = inventory.sync_cloud(
            s,
            "gold",
            [
                HostReport(
                    name="h1",
                    replication_address="10.0.0.1",
                    facts={"libvirt_version": "9.0.0"},
                    vms=[_vm("web", "u-web"), _vm("db", "u-db")],
                ),
                HostReport(name="h2", vms=[_vm("app", "u-app")]),
            ],
            now=at(0),
        )
        assert r.hosts_added == ["h1", "h2"] and sorted(r.vms_added) == ["h1/db", "h1/web", "h2/app"]
        inventory.sync_cloud(s, "gold-dr", [HostReport(name="h9")], now=at(0))
    with store.read() as s:
        assert [h.name for h in inventory.list_hosts(s, cloud="gold")] == ["h1", "h2"]
        assert [v.name for v in inventory.list_vms(s, cloud="gold")] == ["db", "web", "app"]
        h1 = inventory.get_host(s, "h1")
        assert h1.facts == {"libvirt_version": "9.0.0"} and h1.server_id == inventory.get_server(s, "vmm-a").id
        assert [c.name for c in inventory.clouds_of_host(s, "h9")] == ["gold-dr"]
        assert inventory.get_cloud(s, "gold").synced_at == at(0)
        assert inventory.get_site(s, "site-a").name == "site-a"
        assert [x.name for x in inventory.list_servers(s)] == ["vmm-a", "vmm-b"]

    # app moves to h1, db disappears, h2 leaves the cloud.
    with store.transaction() as s:
        app_id = inventory.get_vm(s, "h2", "app").id
        r = inventory.sync_cloud(
            s, "gold", [HostReport(name="h1", vms=[_vm("web", "u-web"), _vm("app", "u-app")])], now=at(60)
        )
        assert r.hosts_removed == ["h2"] and r.vms_removed == ["h1/db"] and r.vms_added == []
    with store.read() as s:
        assert inventory.get_vm(s, "h1", "app").id == app_id  # moved, same row
        with pytest.raises(NotFound):
            inventory.get_vm(s, "h1", "db")
        assert [h.name for h in inventory.list_hosts(s, cloud="gold")] == ["h1"]

    with pytest.raises(BadInput, match="twice"), store.transaction() as s:
        inventory.sync_cloud(s, "gold", [HostReport(name="h1"), HostReport(name="h1")])
    with pytest.raises(NotFound), store.transaction() as s:
        inventory.sync_cloud(s, "no-such-cloud", [])


def _protected_setup(s: Any) -> tuple[int, int, int]:
    """(vm_id, pairing_id, policy_id) for a VM 'web' on h1 in gold, paired to gold-dr."""
    _fabric(s)
    inventory.sync_cloud(s, "gold", [HostReport(name="h1", vms=[_vm("web", "u-web"), _vm("db", "u-db")])])
    inventory.sync_cloud(s, "gold-dr", [HostReport(name="h9")])
    pairing = policies.pair_clouds(s, "gold", "gold-dr")
    policies.create_policy(s, "default")
    policies.associate(s, "default", pairing.id)
    return inventory.get_vm(s, "h1", "web").id, pairing.id, policies.get_policy(s, "default").id


def test_a_protected_vm_that_disappears_is_kept_as_missing(store: Store) -> None:
    with store.transaction() as s:
        vm_id, pairing_id, policy_id = _protected_setup(s)
        items.create(s, vm_id=vm_id, pairing_id=pairing_id, policy_id=policy_id)
    with store.transaction() as s:
        r = inventory.sync_cloud(s, "gold", [HostReport(name="h1", vms=[])], now=at(5))
        assert r.vms_missing == ["h1/web"] and r.vms_removed == ["h1/db"]
    with store.read() as s:
        assert inventory.get_vm(s, "h1", "web").missing_since == at(5)
        assert [v.name for v in inventory.list_vms(s, present_only=True)] == []
    with store.transaction() as s:
        r = inventory.sync_cloud(s, "gold", [HostReport(name="h1", vms=[_vm("web", "u-web2")])], now=at(9))
        assert r.vms_replaced == ["h1/web"]
    with store.read() as s:
        vm = inventory.get_vm(s, "h1", "web")
        assert vm.id == vm_id and vm.missing_since is None and vm.uuid == "u-web2"


# ---------------------------------------------------------------- registration and agents


def test_registration_key_lifecycle_and_expiry(store: Store) -> None:
    with store.transaction() as s:
        key, secret = agents.issue_registration_key(s, created_by="alice", now=T0)
        key_id = key.id
        assert key.expires_at == T0 + timedelta(days=5)
        assert secret.startswith(key.prefix) and secret not in (key.key_hash, key.prefix)
    with store.read() as s:  # only the hash is stored
        row = s.get_one(RegistrationKey, key_id)
        assert secret not in {str(v) for v in vars(row).values()}

    with store.transaction() as s:
        assert agents.redeem_registration_key(s, secret, now=T0 + timedelta(days=4, hours=23)).id == key_id
        agents.redeem_registration_key(s, secret, now=T0 + timedelta(days=5) - timedelta(seconds=1))
    with store.read() as s:
        assert s.get_one(RegistrationKey, key_id).use_count == 2
    with pytest.raises(agents.RegistrationRefused, match="expired"), store.transaction() as s:
        agents.redeem_registration_key(s, secret, now=T0 + timedelta(days=5))
    with pytest.raises(agents.RegistrationRefused, match="unknown"), store.transaction() as s:
        agents.redeem_registration_key(s, "sbk_not-a-key", now=T0)
    with store.read() as s:
        assert agents.list_registration_keys(s, valid_at=T0 + timedelta(days=1))[0].id == key_id
        assert agents.list_registration_keys(s, valid_at=T0 + timedelta(days=6)) == []

    with store.transaction() as s:
        agents.revoke_registration_key(s, key_id, now=at(10))
    with pytest.raises(agents.RegistrationRefused, match="revoked"), store.transaction() as s:
        agents.redeem_registration_key(s, secret, now=at(20))
    with pytest.raises(BadInput), store.transaction() as s:
        agents.issue_registration_key(s, validity=timedelta(0))


def test_agents_register_heartbeat_and_go_stale(store: Store) -> None:
    with store.transaction() as s:
        key, secret = agents.issue_registration_key(s, now=T0)
        agents.register_agent(
            s,
            name="agent-h1",
            host_name="h1",
            address="10.0.0.1:7443",
            version="0.1.0",
            cert_fingerprint="aa" * 32,
            cert_serial="01",
            cert_not_after=T0 + timedelta(days=365),
            registration_key_id=key.id,
            now=T0,
        )
        agents.register_agent(s, name="agent-h2", host_name="h2", cert_fingerprint="bb" * 32, now=T0)
        agents.register_agent(s, name="vmm-a", kind="server", host_name="h1", now=T0)
    with store.transaction() as s:
        agents.heartbeat(s, "agent-h1", now=at(100), facts={"load": 0.1})
    with store.read() as s:
        a = agents.get_agent(s, "agent-h1")
        assert (a.registered_at, a.last_heartbeat_at, a.facts) == (T0, at(100), {"load": 0.1})
        assert a.cert_not_after == T0 + timedelta(days=365)
        assert agents.agent_for_host(s, "h1").name == "agent-h1"  # the agent, not the server
        assert agents.agent_by_fingerprint(s, "bb" * 32).name == "agent-h2"  # type: ignore[union-attr]
        assert [x.name for x in agents.stale_agents(s, timeout=timedelta(seconds=60), now=at(120))] == [
            "agent-h2",
            "vmm-a",
        ]
        assert [x.name for x in agents.list_agents(s, kind="server")] == ["vmm-a"]
        with pytest.raises(NotFound):
            agents.agent_for_host(s, "h7")

    with store.transaction() as s:
        agents.revoke_agent(s, "agent-h2")
    with store.read() as s:
        assert agents.agent_by_fingerprint(s, "bb" * 32) is None
    with pytest.raises(Refused, match="revoked"), store.transaction() as s:
        agents.heartbeat(s, "agent-h2")
    with store.transaction() as s:  # registering again reactivates, with a new certificate
        agents.register_agent(s, name="agent-h2", host_name="h2", cert_fingerprint="cc" * 32, now=at(200))
    with store.read() as s:
        assert agents.agent_by_fingerprint(s, "cc" * 32).state == "active"  # type: ignore[union-attr]
        assert s.scalar(select(Agent).where(Agent.name == "agent-h2")).registered_at == at(200)  # type: ignore[union-attr]
    with pytest.raises(Conflict), store.transaction() as s:  # one certificate, one agent
        agents.register_agent(s, name="agent-h3", host_name="h3", cert_fingerprint="cc" * 32)


# ---------------------------------------------------------------- policies, pairing, mapping


def test_policy_defaults_follow_the_reference(store: Store) -> None:
    with store.transaction() as s:
        p = policies.create_policy(s, "default")
    assert (p.copy_frequency_seconds, p.recovery_point_retention_hours, p.app_consistent_interval_hours) == (300, 0, 0)
    assert (p.compression, p.authentication, p.replication_port) == (True, "certificate", 7443)
    assert (p.initial_replication, p.delete_replica_on_disable, p.continuous) == ("now", False, False)
    assert p.keep_all_points_minutes == 0  # the reference's hourly points only


def test_policy_crud_and_validation(store: Store) -> None:
    start = at(3600)
    with store.transaction() as s:
        policies.create_policy(
            s,
            "fast",
            copy_frequency_seconds=30,
            recovery_point_retention_hours=24,
            app_consistent_interval_hours=4,
            compression=False,
        )
        policies.create_policy(s, "cdp", copy_frequency_seconds=0)
        policies.create_policy(
            s, "night", copy_frequency_seconds=900, initial_replication="scheduled", initial_replication_at=start
        )
        policies.create_policy(
            s,
            "seed",
            initial_replication="offline",
            offline_export_path="/mnt/export",
            offline_import_path="/mnt/import",
            delete_replica_on_disable=True,
        )
    with store.read() as s:
        assert [p.name for p in policies.list_policies(s)] == ["cdp", "fast", "night", "seed"]
        assert policies.get_policy(s, "cdp").continuous
        assert policies.get_policy(s, "night").initial_replication_at == start
        assert policies.get_policy(s, "seed").offline_import_path == "/mnt/import"

    for bad, match in [
        ({"copy_frequency_seconds": 60}, "copy frequency 60"),
        ({"initial_replication": "scheduled"}, "start time"),
        ({"initial_replication": "offline", "offline_export_path": "/x"}, "export and import"),
        ({"authentication": "password"}, "authentication"),
        ({"replication_port": 0}, "port"),
        ({"recovery_point_retention_hours": -1}, "negative"),
        ({"keep_all_points_minutes": -1}, "keep_all_points_minutes -1"),
        ({"keep_all_points_minutes": 1441}, "keep_all_points_minutes 1441"),
        ({"keep_all_points_minutes": 2.5}, "keep_all_points_minutes 2.5"),
        ({"keep_all_points_minutes": True}, "keep_all_points_minutes True"),
        ({"colour": "blue"}, "unknown policy settings"),
    ]:
        with pytest.raises(BadInput, match=match), store.transaction() as s:
            policies.create_policy(s, "bad", **bad)
    with pytest.raises(Conflict, match="exists"), store.transaction() as s:
        policies.create_policy(s, "fast")

    with store.transaction() as s:
        policies.update_policy(s, "fast", copy_frequency_seconds=300, now=at(1))
    with store.read() as s:
        p = policies.get_policy(s, "fast")
        assert p.copy_frequency_seconds == 300 and p.updated_at == at(1) and p.compression is False
    with pytest.raises(BadInput), store.transaction() as s:
        policies.update_policy(s, "fast", copy_frequency_seconds=5)
    with store.transaction() as s:
        assert policies.update_policy(s, "fast", keep_all_points_minutes=1440).keep_all_points_minutes == 1440
    with pytest.raises(BadInput, match="between 0 and 1440"), store.transaction() as s:
        policies.update_policy(s, "fast", keep_all_points_minutes=1441)
    with store.read() as s:
        assert policies.get_policy(s, "fast").keep_all_points_minutes == 1440
    with store.transaction() as s:
        policies.delete_policy(s, "cdp")
    with pytest.raises(NotFound), store.read() as s:
        policies.get_policy(s, "cdp")


def test_pairings_associations_and_network_mappings(store: Store) -> None:
    with store.transaction() as s:
        _fabric(s)
        inventory.ensure_cloud(s, "silver", server="vmm-a")
        pairing = policies.pair_clouds(s, "gold", "gold-dr")
        pairing_id = pairing.id
        policies.create_policy(s, "p1")
        policies.create_policy(s, "p2")
        policies.associate(s, "p1", pairing_id)
        policies.associate(s, "p1", pairing_id)  # idempotent
        policies.associate(s, "p2", pairing_id)
    with store.read() as s:
        got = policies.get_pairing(s, pairing_id)
        assert (got.primary.name, got.secondary.name) == ("gold", "gold-dr")
        assert [p.name for p in got.policies] == ["p1", "p2"]
        assert [p.id for p in policies.get_policy(s, "p1").pairings] == [pairing_id]
        assert policies.pairing_of_primary(s, "silver") is None
    with pytest.raises(Conflict, match="already paired"), store.transaction() as s:
        policies.pair_clouds(s, "gold", "silver")
    with pytest.raises(BadInput), store.transaction() as s:
        policies.pair_clouds(s, "gold", "gold")
    with store.transaction() as s:
        policies.dissociate(s, "p2", pairing_id)
    with store.read() as s:
        assert [p.name for p in policies.get_pairing(s, pairing_id).policies] == ["p1"]
    with pytest.raises(NotFound), store.transaction() as s:
        policies.dissociate(s, "p2", pairing_id)

    with store.transaction() as s:
        inventory.ensure_network(s, "prod", site="site-a")
        inventory.ensure_network(s, "prod-dr", site="site-b")
        inventory.ensure_network(s, "test", site="site-b")
        policies.map_network(s, "prod", "prod-dr")
    with store.read() as s:
        m = policies.mapping_for(s, "prod")
        assert m is not None and m.secondary.name == "prod-dr" and m.primary.site.name == "site-a"  # type: ignore[union-attr]
        assert len(policies.list_mappings(s)) == 1 and [n.name for n in inventory.list_networks(s)] == [
            "prod",
            "prod-dr",
            "test",
        ]
    with pytest.raises(Conflict, match="already mapped"), store.transaction() as s:
        policies.map_network(s, "prod", "test")
    with store.transaction() as s:
        policies.unmap_network(s, "prod")
        policies.map_network(s, "prod", "test")
        policies.unpair(s, pairing_id)
    with store.read() as s:
        assert policies.list_pairings(s) == []


# ---------------------------------------------------------------- protected items


def test_protected_item_lifecycle_in_the_store(store: Store) -> None:
    with store.transaction() as s:
        vm_id, pairing_id, policy_id = _protected_setup(s)
        policies.create_policy(s, "unassociated")
        item = items.create(
            s,
            vm_id=vm_id,
            pairing_id=pairing_id,
            policy_id=policy_id,
            secondary_host_id=inventory.get_host(s, "h9").id,
            next_cycle_at=at(300),
            now=T0,
        )
        item_id = item.id
    with pytest.raises(Conflict, match="already protected"), store.transaction() as s:
        items.create(s, vm_id=vm_id, pairing_id=pairing_id, policy_id=policy_id)
    with pytest.raises(Refused, match="not associated"), store.transaction() as s:
        db_id = inventory.get_vm(s, "h1", "db").id
        items.create(s, vm_id=db_id, pairing_id=pairing_id, policy_id=policies.get_policy(s, "unassociated").id)

    with store.transaction() as s:
        items.set_state(s, item_id, "initial_replication", expected="ready", now=at(1))
    with pytest.raises(Conflict, match="is initial_replication, not ready"), store.transaction() as s:
        items.set_state(s, item_id, "protected", expected="ready")

    def domain_next(current: str) -> str:
        if current != "initial_replication":
            raise Refused(f"no seed_done from {current}")
        return "protected"

    with store.transaction() as s:
        items.transition(s, item_id, domain_next, now=at(2))
    with pytest.raises(Refused, match="no seed_done from protected"), store.transaction() as s:
        items.transition(s, item_id, domain_next)
    with store.transaction() as s:
        items.record_cycle(
            items.get(s, item_id, lock=True),
            recovery_point_id="rp-1",
            recovery_point_at=at(290),
            bytes_sent=1 << 20,
            next_cycle_at=at(600),
            now=at(300),
        )
        items.record_cycle(
            items.get(s, item_id, lock=True),
            recovery_point_id="rp-2",
            recovery_point_at=at(590),
            bytes_sent=5 << 30,
            next_cycle_at=at(900),
            now=at(600),
        )
        items.set_health(s, item_id, "warning", "RPO 310 s exceeds 300 s", now=at(600))
        items.update_details(s, item_id, replica="/var/lib/standby/replicas/web")
    with store.read() as s:
        it = items.get(s, item_id)
        assert (it.state, it.state_changed_at, it.last_recovery_point_id) == ("protected", at(2), "rp-2")
        assert it.bytes_replicated == (1 << 20) + (5 << 30)  # beyond 32 bits
        assert it.rpo_seconds == 10.0 and it.last_recovery_point_at == at(590)
        assert (it.health, it.health_reason) == ("warning", "RPO 310 s exceeds 300 s")
        assert it.vm.name == "web" and it.policy.name == "default" and it.secondary_host.name == "h9"  # type: ignore[union-attr]
        assert it.details == {"replica": "/var/lib/standby/replicas/web"}
        assert [i.id for i in items.list_items(s, states=["protected"], health="warning")] == [item_id]
        assert items.due(s, now=at(899)) == [] and [i.id for i in items.due(s, now=at(900))] == [item_id]
    with pytest.raises(BadInput), store.transaction() as s:
        items.set_health(s, item_id, "fine")

    # The association cannot go while the item uses it; the policy cannot be deleted.
    with pytest.raises(Conflict, match="protects 1 item"), store.transaction() as s:
        policies.dissociate(s, "default", pairing_id)
    with pytest.raises(Conflict, match="protects 1 item"), store.transaction() as s:
        policies.delete_policy(s, "default")
    with pytest.raises(Conflict, match="protected item"), store.transaction() as s:
        policies.unpair(s, pairing_id)

    # Disabled, the VM can be protected again (the old item is replaced).
    with store.transaction() as s:
        items.set_state(s, item_id, "disabled", expected="protected")
        items.schedule(s, item_id, None)
        new = items.create(s, vm_id=vm_id, pairing_id=pairing_id, policy_id=policy_id)
        assert new.id != item_id
    with store.transaction() as s:
        items.delete(s, new.id)
    with store.read() as s:
        assert items.by_vm(s, vm_id) is None


# ---------------------------------------------------------------- alerts and webhooks


def test_alerts_deduplicate_and_queue_webhook_deliveries(store: Store) -> None:
    with store.transaction() as s:
        alerts.add_webhook(s, "all", "https://hooks.example/all", secret="s3")
        alerts.add_webhook(
            s, "rpo-critical", "https://hooks.example/rpo", kinds=["rpo_breach"], min_severity="critical"
        )
        alerts.add_webhook(s, "off", "https://hooks.example/off", enabled=False)
        a, new = alerts.raise_alert(
            s, kind="rpo_breach", severity="warning", subject="item:web", message="RPO 400 s > 300 s", now=at(0)
        )
        assert new
        a2, new2 = alerts.raise_alert(
            s, kind="rpo_breach", severity="critical", subject="item:web", message="RPO 900 s > 300 s", now=at(60)
        )
        assert not new2 and a2.id == a.id
        alert_id = a.id
        alerts.raise_alert(
            s, kind="heartbeat_lost", severity="critical", subject="agent:h2", message="silent 90 s", now=at(0)
        )
    with store.read() as s:
        got = alerts.list_alerts(s, kind="rpo_breach")[0]
        assert (got.severity, got.message, got.raised_at, got.last_seen_at) == (
            "critical",
            "RPO 900 s > 300 s",
            at(0),
            at(60),
        )
        # Deliveries were queued when it was raised (as a warning): only "all" wanted it.
        assert [(d.webhook.name, d.event) for d in alerts.deliveries_of(s, alert_id)] == [("all", "raised")]
        assert len(alerts.list_alerts(s, open_only=True)) == 2
        due = alerts.due_deliveries(s, now=at(61))
        assert len(due) == 2  # rpo (all) + heartbeat (all, rpo-critical wants only rpo_breach)

    with store.transaction() as s:
        d1, d2 = alerts.due_deliveries(s, now=at(61))
        alerts.record_delivery(s, d1.id, ok=True, now=at(62))
        alerts.record_delivery(s, d2.id, ok=False, error="HTTP 503", retry_at=at(120), now=at(62))
    with store.read() as s:
        assert alerts.due_deliveries(s, now=at(100)) == []
        assert [d.attempts for d in alerts.due_deliveries(s, now=at(120))] == [1]
        assert alerts.delivery_summary(s, alert_id) == {"pending": 0, "delivered": 1, "failed": 0}
    with store.transaction() as s:
        d = alerts.due_deliveries(s, now=at(120))[0]
        alerts.record_delivery(s, d.id, ok=False, error="HTTP 503", now=at(121))  # given up
        assert d.state == "failed" and d.last_error == "HTTP 503"
    with pytest.raises(BadInput), store.transaction() as s:
        alerts.record_delivery(s, d.id, ok=True)

    with store.transaction() as s:
        cleared = alerts.clear_alert(s, kind="rpo_breach", subject="item:web", now=at(300))
        assert cleared is not None and cleared.cleared_at == at(300)
        assert alerts.clear_alert(s, kind="rpo_breach", subject="item:web") is None
        again, new = alerts.raise_alert(
            s, kind="rpo_breach", severity="critical", subject="item:web", message="again", now=at(400)
        )
        assert new and again.id != alert_id
    with store.read() as s:
        assert [(d.webhook.name, d.event) for d in alerts.deliveries_of(s, alert_id)] == [
            ("all", "raised"),
            ("all", "cleared"),
            ("rpo-critical", "cleared"),
        ]
        assert len(alerts.list_alerts(s, subject="item:web")) == 2
    with store.transaction() as s:
        alerts.clear_alert_by_id(s, again.id, now=at(500))
        alerts.set_webhook_enabled(s, "off", True)
        alerts.remove_webhook(s, "rpo-critical")
    with store.read() as s:
        assert [w.name for w in alerts.list_webhooks(s)] == ["all", "off"]
        assert alerts.list_alerts(s, open_only=True, kind="rpo_breach") == []
    with pytest.raises(BadInput), store.transaction() as s:
        alerts.add_webhook(s, "ftp", "ftp://example")
    with pytest.raises(BadInput), store.transaction() as s:
        alerts.raise_alert(s, kind="x", severity="fatal", subject="y", message="z")


# ---------------------------------------------------------------- API tokens


def test_api_tokens(store: Store) -> None:
    with store.transaction() as s:
        op, op_secret = tokens.create_token(s, "ops", role="operator", created_by="admin", now=T0)
        _, viewer_secret = tokens.create_token(s, "dash", role="viewer", expires_at=at(3600), now=T0)
        assert op_secret.startswith(op.prefix) and op.token_hash != op_secret
    with store.transaction() as s:
        got = tokens.authenticate(s, op_secret, now=at(10))
        assert got is not None and got.role == "operator" and got.last_used_at == at(10)
        assert tokens.authenticate(s, op_secret, now=at(20)).last_used_at == at(10)  # type: ignore[union-attr]
        assert tokens.authenticate(s, viewer_secret, now=at(3599)) is not None
        assert tokens.authenticate(s, viewer_secret, now=at(3600)) is None  # expired
        assert tokens.authenticate(s, "sbt_wrong", now=at(10)) is None
        tokens.revoke_token(s, "ops", now=at(30))
        assert tokens.authenticate(s, op_secret, now=at(31)) is None
    with store.read() as s:
        assert [t.name for t in tokens.list_tokens(s)] == ["dash", "ops"]
    with pytest.raises(BadInput, match="role"), store.transaction() as s:
        tokens.create_token(s, "root", role="admin")


# ---------------------------------------------------------------- jobs


def test_job_runs_its_steps_and_succeeds(store: Store) -> None:
    with store.transaction() as s:
        job = jobs.create(
            s,
            kind="protect",
            target="item:1",
            created_by="alice",
            payload={"item": 1},
            steps=["readiness", "seed", "first cycle"],
            now=T0,
        )
        job_id = job.id
        assert (job.state, job.progress, [st.state for st in job.steps]) == ("queued", 0, ["pending"] * 3)
    with store.transaction() as s:
        jobs.start(s, job_id, runner="cp:1", now=at(1))
        jobs.start_step(s, job_id, 0, now=at(1))
        jobs.finish_step(s, job_id, 0, StepState.SUCCEEDED, message="ready", now=at(2))
        jobs.start_step(s, job_id, 1, now=at(2))
        jobs.update_step(s, job_id, 1, progress=40, message="1.2 GiB of 3")
        jobs.report(s, job_id, progress=50, message="seeding", now=at(3))
    with store.read() as s:
        j = jobs.get(s, job_id)
        assert (j.state, j.progress, j.message, j.started_at, j.attempts, j.runner) == (
            "running",
            50,
            "seeding",
            at(1),
            1,
            "cp:1",
        )
        assert [(st.name, st.state, st.progress) for st in j.steps] == [
            ("readiness", "succeeded", 100),
            ("seed", "running", 40),
            ("first cycle", "pending", 0),
        ]
        assert j.steps[0].started_at == at(1) and j.steps[0].ended_at == at(2)
    with store.transaction() as s:
        jobs.finish_step(s, job_id, 1, "succeeded", now=at(4))
        jobs.finish(s, job_id, JobState.SUCCEEDED, result={"recovery_point": "rp-1"}, now=at(5))
    with store.read() as s:
        j = jobs.get(s, job_id)
        assert (j.state, j.progress, j.ended_at, j.result, j.error) == (
            "succeeded",
            100,
            at(5),
            {"recovery_point": "rp-1"},
            None,
        )
        assert [st.state for st in j.steps] == ["succeeded", "succeeded", "skipped"]
        assert jobs.unfinished(s) == []


@pytest.mark.parametrize("final", [JobState.FAILED, JobState.ERRORED])
def test_failed_and_errored_jobs_keep_why(store: Store, final: JobState) -> None:
    with store.transaction() as s:
        job_id = jobs.create(s, kind="failover", steps=["a", "b"]).id
        jobs.start(s, job_id)
        jobs.start_step(s, job_id, 0)
    with pytest.raises(BadInput, match="needs an error"), store.transaction() as s:
        jobs.finish(s, job_id, final)
    with store.transaction() as s:
        jobs.finish(s, job_id, final, error="readiness found 2 errors" if final == "failed" else "KeyError: 'disk'")
    with store.read() as s:
        j = jobs.get(s, job_id)
        assert j.state == final.value and j.error
        assert [st.state for st in j.steps] == [final.value, "skipped"]


def test_terminal_states_are_final_and_transitions_follow_the_table(store: Store) -> None:
    # Drive a job into every state through allowed moves, then try every move from there.
    paths: dict[JobState, list[JobState]] = {
        JobState.QUEUED: [],
        JobState.RUNNING: [JobState.RUNNING],
        **{t: [JobState.RUNNING, t] for t in JOB_TERMINAL},
    }

    def apply(s: Any, job_id: int, new: JobState) -> None:
        if new == JobState.RUNNING:
            jobs.start(s, job_id)
        elif new == JobState.QUEUED:
            jobs.requeue(s, job_id, message="again")
        else:
            jobs.finish(s, job_id, new, error="why")

    for start_state, path in paths.items():
        for new in JobState:
            with store.transaction() as s:
                job_id = jobs.create(s, kind="probe").id
                for st in path:
                    apply(s, job_id, st)
            allowed = new in JOB_TRANSITIONS[start_state]
            if allowed:
                with store.transaction() as s:
                    apply(s, job_id, new)
                with store.read() as s:
                    assert jobs.get(s, job_id).state == new.value
            else:
                with pytest.raises(Refused) as err, store.transaction() as s:
                    apply(s, job_id, new)
                if start_state in JOB_TERMINAL:
                    assert "has ended" in str(err.value)
                with store.read() as s:
                    assert jobs.get(s, job_id).state == start_state.value

    with store.transaction() as s:
        done = jobs.create(s, kind="k").id
        jobs.start(s, done)
        jobs.finish(s, done, "succeeded")
    for call in (
        lambda s: jobs.report(s, done, progress=10),
        lambda s: jobs.start_step(s, done, 0),
        lambda s: jobs.request_cancel(s, done),
    ):
        with pytest.raises(Refused), store.transaction() as s:
            call(s)
    with pytest.raises(BadInput), store.transaction() as s:
        jobs.finish(s, done, "running")


def test_progress_bounds_and_unknown_steps(store: Store) -> None:
    with store.transaction() as s:
        job_id = jobs.create(s, kind="k", steps=["only"]).id
        jobs.start(s, job_id)
    with pytest.raises(BadInput, match="between 0 and 100"), store.transaction() as s:
        jobs.report(s, job_id, progress=101)
    with pytest.raises(BadInput, match="no step 3"), store.transaction() as s:
        jobs.start_step(s, job_id, 3)
    with pytest.raises(Refused, match="not running"), store.transaction() as s:
        jobs.update_step(s, job_id, 0, progress=5)
    with store.transaction() as s:
        jobs.finish_step(s, job_id, 0, "skipped")
    with pytest.raises(Refused, match="cannot go from skipped"), store.transaction() as s:
        jobs.start_step(s, job_id, 0)
    with pytest.raises(NotFound), store.read() as s:
        jobs.get(s, 999_999)


def test_jobs_reach_the_runner_only_after_commit(store: Store) -> None:
    handed: list[int] = []
    with store.transaction() as s:
        job = jobs.create(s, kind="protect", on_commit=handed.append)
        assert handed == []  # not before the commit
        # The runner would find the row: the callback runs after the commit.
    assert handed == [job.id]
    with store.read() as s:
        assert jobs.get(s, job.id).state == "queued"

    with pytest.raises(RuntimeError):
        with store.transaction() as s:
            rolled = jobs.create(s, kind="protect", on_commit=handed.append)
            raise RuntimeError("the transaction fails after creating the job")
    assert handed == [job.id]
    with store.read() as s:
        assert rolled.id not in [j.id for j in jobs.list_jobs(s)]

    seen_state: list[str] = []

    def dispatch(job_id: int) -> None:
        with store.read() as s:  # a runner in another session sees the committed row
            seen_state.append(jobs.get(s, job_id).state)

    submitted = jobs.submit(store, dispatch, kind="replicate", target="item:1")
    assert seen_state == ["queued"] and submitted.target == "item:1"
    with store.read() as s:
        assert [j.id for j in jobs.list_jobs(s, kind="replicate")] == [submitted.id]
        assert [j.id for j in jobs.list_jobs(s, states=["queued"], limit=1)] == [submitted.id]
        assert [j.id for j in jobs.list_jobs(s, before_id=submitted.id, target="")] == [job.id]


def test_cancel(store: Store) -> None:
    with store.transaction() as s:
        queued = jobs.create(s, kind="k", steps=["a"]).id
        running = jobs.create(s, kind="k", steps=["a", "b"]).id
        jobs.start(s, running)
        jobs.start_step(s, running, 0)
    with store.transaction() as s:
        assert jobs.request_cancel(s, queued, now=at(1)).state == "cancelled"
        j = jobs.request_cancel(s, running, now=at(1))
        assert j.state == "running" and j.cancel_requested_at == at(1)
    with store.transaction() as s:  # the runner notices and stops
        jobs.finish(s, running, JobState.CANCELLED, now=at(2))
    with store.read() as s:
        assert [st.state for st in jobs.get(s, queued).steps] == ["cancelled"]
        assert [st.state for st in jobs.get(s, running).steps] == ["cancelled", "cancelled"]


def test_restart_recovery_resumes_or_cleanly_fails(store: Store) -> None:
    with store.transaction() as s:
        waiting = jobs.create(s, kind="k").id
        resumable = jobs.create(s, kind="replicate", resumable=True, payload={"offset": 123}, steps=["copy"]).id
        plain = jobs.create(s, kind="failover", steps=["boot"]).id
        cancelling = jobs.create(s, kind="k").id
        done = jobs.create(s, kind="k").id
        for j in (resumable, plain, cancelling, done):
            jobs.start(s, j, runner="old:1")
        jobs.start_step(s, resumable, 0)
        jobs.start_step(s, plain, 0)
        jobs.request_cancel(s, cancelling)
        jobs.finish(s, done, "succeeded")
    with store.read() as s:
        assert [j.id for j in jobs.unfinished(s)] == [waiting, resumable, plain, cancelling]

    with store.transaction() as s:
        rec = jobs.recover_at_startup(s, now=at(100))
    assert (rec.queued, rec.requeued, rec.errored, rec.cancelled) == ([waiting], [resumable], [plain], [cancelling])
    assert rec.to_dispatch == [waiting, resumable]
    with store.read() as s:
        r = jobs.get(s, resumable)
        assert (r.state, r.payload, r.runner, [st.state for st in r.steps]) == (
            "queued",
            {"offset": 123},
            None,
            ["pending"],
        )
        p = jobs.get(s, plain)
        assert p.state == "errored" and "control plane stopped" in (p.error or "") and "old:1" in (p.error or "")
        assert p.ended_at == at(100) and [st.state for st in p.steps] == ["errored"]
        assert jobs.get(s, cancelling).state == "cancelled"
    with store.transaction() as s:  # the resumed job runs again: a second attempt
        assert jobs.start(s, resumable, runner="new:2").attempts == 2


_KILLED_WORKER = """
import os, sys
from standby.store import open_store
from standby.store.repo import jobs
store = open_store(sys.argv[1])
with store.transaction() as s:
    j = jobs.create(s, kind="failover", steps=["boot"], payload={"vm": "web"})
with store.transaction() as s:
    jobs.start(s, j.id, runner="killed")
    jobs.start_step(s, j.id, 0)
s = store._write()
s.begin()
jobs.create(s, kind="never-committed")
s.flush()
print(j.id, flush=True)
os._exit(9)  # the control plane dies: no commit, no cleanup
"""


def test_a_killed_control_plane_never_loses_a_committed_job(store_url: str) -> None:
    out = subprocess.run([sys.executable, "-c", _KILLED_WORKER, store_url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr
    job_id = int(out.stdout.strip())
    store = open_store(store_url)
    try:
        with store.transaction() as s:
            assert [(j.id, j.state) for j in jobs.unfinished(s)] == [(job_id, "running")]
            rec = jobs.recover_at_startup(s)
        assert rec.errored == [job_id]
        with store.read() as s:
            assert [j.kind for j in jobs.list_jobs(s)] == ["failover"]
    finally:
        store.close()


def test_concurrent_starts_of_one_job_let_exactly_one_win(store: Store) -> None:
    with store.transaction() as s:
        job_ids = [jobs.create(s, kind="race").id for _ in range(5)]
    results: dict[int, list[str]] = {j: [] for j in job_ids}
    barrier = threading.Barrier(4)

    def runner(name: str) -> None:
        barrier.wait()
        for job_id in job_ids:
            try:
                with store.transaction() as s:
                    jobs.start(s, job_id, runner=name)
                results[job_id].append(name)
            except Refused:
                pass

    threads = [threading.Thread(target=runner, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(len(winners) == 1 for winners in results.values()), results
    with store.read() as s:
        for job_id, winners in results.items():
            j = jobs.get(s, job_id)
            assert (j.state, j.runner, j.attempts) == ("running", winners[0], 1)
