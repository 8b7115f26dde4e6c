"""The agent's recovery tasks (agent/recovery.py): parameter checks and dispatch (before
any hypervisor or store is touched), materialize on a real replica store (qemu-img makes
the overlays), adopting an image into a replica (`seeding.adopt_source` over a raw file)
and the vm_prefix of the agent's configuration. The tasks on libvirt itself are in
tests/integration/test_agent_recovery.py."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from standby.agent.config import AgentConfig, replica_vm_name
from standby.agent.recovery import MANIFEST, RECOVERY_TASKS
from standby.agent.tasks import DISPATCH, TaskEnv, execute
from standby.errors import BadInput
from standby.replication.changes import FullSource
from standby.replication.digest import BLOCK_SIZE, HashTable, block_digest, n_blocks
from standby.replication.seeding import adopt_source
from standby.replication.store import ReplicaStore

SIZE = 16 * BLOCK_SIZE
KINDS = ["materialize", "release", "define_vm", "start_vm", "stop_vm", "undefine_vm", "create_network",
         "delete_network", "adopt_disk", "restore_disk"]


def _no_driver() -> Any:
    raise AssertionError("this task must not touch the hypervisor")


def _no_tls() -> Any:
    raise AssertionError("this task must not open a replication link")


@pytest.fixture
def env(tmp_path: Path) -> TaskEnv:
    return TaskEnv(ReplicaStore(tmp_path / "replicas"), tmp_path / "state", _no_driver, _no_tls,
                   owns=lambda vm: vm.startswith("dr-"))


def _commit(store: ReplicaStore, disk_id: str, raw: bytes | bytearray) -> str:
    disk = store.create_disk(disk_id, len(raw))
    latest = disk.latest()
    w = disk.begin_cycle(f"c{time.monotonic_ns()}", latest.id if latest else None)
    table = HashTable(len(raw))
    for i in range(n_blocks(len(raw))):
        block = bytes(raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
        table.set(i, block_digest(block))
        w.write(i * BLOCK_SIZE, block)
    return w.commit(table.disk_digest(), "crash", time.time(), {}).id


def test_every_recovery_kind_is_dispatched() -> None:
    assert sorted(RECOVERY_TASKS) == sorted(KINDS)
    for kind in KINDS:
        assert DISPATCH[kind] is RECOVERY_TASKS[kind]
    for kind in ("cycle", "prune", "delete_replica", "list_points", "seed_export", "seed_import"):
        assert kind in DISPATCH  # the earlier kinds are still there


@pytest.mark.parametrize(("kind", "params", "match"), [
    ("materialize", {"vm": "web", "disk_ids": {"vda": "web-vda"}}, "'tag'"),
    ("materialize", {"vm": "web", "disk_ids": {"vda": "web-vda"}, "tag": "a/b"}, "'tag'"),
    ("materialize", {"vm": "web", "disk_ids": {}, "tag": "t1"}, "'disk_ids'"),
    ("materialize", {"vm": "web", "disk_ids": {"eth0": "web-vda"}, "tag": "t1"}, "disk target"),
    ("materialize", {"vm": "web", "disk_ids": {"vda": "../x"}, "tag": "t1"}, "disk id"),
    ("materialize", {"vm": "web", "disk_ids": {"vda": "d", "vdb": "d"}, "tag": "t1"}, "twice"),
    ("materialize", {"vm": "web", "disk_ids": {"vda": "d"}, "tag": "t1", "purpose": "fun"}, "purpose"),
    ("materialize", {"vm": "web", "disk_ids": {"vda": "d"}, "tag": "t1", "point": "0000000001"}, "'point'"),
    ("materialize", {"vm": "web", "disk_ids": {"vda": "d"}, "tag": "t1", "point": {"e": "1"}}, "not in 'disk_ids'"),
    ("materialize", {"disk_ids": {"vda": "d"}, "tag": "t1"}, "'vm'"),
    ("release", {}, "'tag'"),
    ("define_vm", {"name": "dr-web"}, "'disks'"),
    ("define_vm", {"name": "dr-web", "disks": {"vda": "/x.qcow2"}, "networks": "net"}, "'networks'"),
    ("define_vm", {"name": "dr-web", "disks": {"vda": "/x.qcow2"}, "template_xml": 5}, "template_xml"),
    ("define_vm", {"name": "dr-web", "disks": {"vda": "/x.qcow2"}, "template_xml": "<domain"}, "well-formed"),
    ("define_vm", {"name": "dr-web", "disks": {"vda": "/x"}, "isolated_network": ""}, "isolated_network"),
    ("start_vm", {"name": ""}, "'name'"),
    ("stop_vm", {"name": "dr-web", "timeout_seconds": -1}, "timeout_seconds"),
    ("stop_vm", {"name": "dr-web", "timeout_seconds": True}, "timeout_seconds"),
    ("stop_vm", {"name": "dr-web", "force": "yes"}, "'force'"),
    ("undefine_vm", {"name": None}, "'name'"),
    ("create_network", {"name": "a/b"}, "'name'"),
    ("delete_network", {}, "'name'"),
    ("adopt_disk", {"image": "/x.qcow2"}, "'disk_id'"),
    ("adopt_disk", {"disk_id": "web-vda", "image": "relative.qcow2"}, "absolute"),
    ("restore_disk", {"disk_id": "web vda", "image": "/x"}, "disk id"),
    ("cycle", {"vm": "dr-web", "peer": {"name": "b", "address": "127.0.0.1:7443"}, "disk_ids": ["web-vda"]},
     "'disk_ids'"),
])
def test_bad_parameters_are_refused_before_anything_is_touched(env: TaskEnv, kind: str, params: dict[str, Any],
                                                               match: str) -> None:
    out = execute(env, {"id": 1, "kind": kind, "params": params})
    assert not out.ok and out.error_type == "BadInput", out
    assert match in (out.error or ""), out


@pytest.mark.parametrize("kind", ["define_vm", "start_vm", "stop_vm", "undefine_vm"])
def test_vm_tasks_refuse_a_domain_outside_the_filter(env: TaskEnv, kind: str) -> None:
    # another agent's VM on a shared libvirtd (the demo's primary, for the "dr-" agent)
    out = execute(env, {"id": 1, "kind": kind, "params": {"name": "demo-web", "disks": {"vda": "/x.qcow2"}}})
    assert not out.ok and out.error_type == "Refused" and "domain filter" in (out.error or ""), out


def test_missing_image_and_replica_are_not_found(env: TaskEnv, tmp_path: Path) -> None:
    out = execute(env, {"id": 1, "kind": "adopt_disk", "params": {"disk_id": "d", "image": str(tmp_path / "no")}})
    assert not out.ok and out.error_type == "NotFound", out
    img = tmp_path / "img.raw"
    img.write_bytes(bytes(SIZE))
    out = execute(env, {"id": 2, "kind": "restore_disk", "params": {"disk_id": "d", "image": str(img)}})
    assert not out.ok and out.error_type == "NotFound" and "no replica disk d" in (out.error or ""), out
    out = execute(env, {"id": 3, "kind": "materialize",
                        "params": {"vm": "web", "disk_ids": {"vda": "nope"}, "tag": "t"}})
    assert not out.ok and out.error_type == "NotFound", out
    assert not (env.store.root / "overlays" / "t").exists()  # nothing pinned, no manifest


def _backing(path: str) -> str:
    r = subprocess.run(["qemu-img", "info", "--output=json", "-U", path], check=True, capture_output=True, text=True)
    import json

    return str(json.loads(r.stdout)["backing-filename"])


def test_materialize_is_idempotent_per_tag_and_pins_the_points(env: TaskEnv) -> None:
    rng = random.Random(3)
    p1 = _commit(env.store, "web-vda", rng.randbytes(SIZE))
    p2 = _commit(env.store, "web-vda", rng.randbytes(SIZE))
    _commit(env.store, "web-vdb", rng.randbytes(SIZE))
    params = {"vm": "web", "disk_ids": {"vda": "web-vda", "vdb": "web-vdb"}, "point": {"web-vda": p1},
              "purpose": "test", "tag": "job-7"}
    out = execute(env, {"id": 1, "kind": "materialize", "params": params})
    assert out.ok, out
    overlays = out.result["overlays"]
    assert set(overlays) == {"vda", "vdb"} and out.result["points"] == {"web-vda": p1, "web-vdb": p1}
    assert _backing(overlays["vda"]).endswith(f"layers/{p1}.qcow2")
    vda = env.store.disk("web-vda")
    assert vda.pinned() == {overlays["vda"]: p1}
    # a newer point meanwhile, then the task again (re-delivered): the same overlays
    _commit(env.store, "web-vdb", rng.randbytes(SIZE))
    again = execute(env, {"id": 1, "kind": "materialize", "params": {**params, "point": {}}})
    assert again.ok and again.result == out.result, again
    # an overlay lost after its pin (a crash between the two): made again
    Path(overlays["vdb"]).unlink()
    assert execute(env, {"id": 1, "kind": "materialize", "params": params}).result == out.result
    assert Path(overlays["vdb"]).is_file()
    # the same tag at other points is refused, not silently changed
    other = execute(env, {"id": 2, "kind": "materialize", "params": {**params, "point": {"web-vda": p2}}})
    assert not other.ok and other.error_type == "Conflict", other
    assert (env.store.root / "overlays" / "job-7" / MANIFEST).is_file()
    # a point that is not retained
    gone = execute(env, {"id": 3, "kind": "materialize",
                         "params": {**params, "tag": "job-8", "point": {"web-vda": "0000000099"}}})
    assert not gone.ok and gone.error_type == "NotFound", gone


def test_adopt_source_stages_only_differing_blocks_and_is_idempotent(tmp_path: Path) -> None:
    rng = random.Random(5)
    store = ReplicaStore(tmp_path / "replicas")
    raw = bytearray(SIZE)
    for i in range(0, n_blocks(SIZE), 2):
        raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = rng.randbytes(BLOCK_SIZE)
    img = tmp_path / "old.raw"
    img.write_bytes(raw)
    first = adopt_source(store, "web-vda", FullSource(img))  # no replica yet: created
    assert not first["reused"] and first["bytes"] == 8 * BLOCK_SIZE and first["blocks_changed"] == 8
    disk = store.disk("web-vda")
    assert disk.latest() is not None and disk.latest().meta["cycle_kind"] == "adopt"
    same = adopt_source(store, "web-vda", FullSource(img))
    assert same["reused"] and same["point"] == first["point"] and same["bytes"] == 0
    assert len(disk.points()) == 1
    # two blocks rewritten, one data block zeroed: three blocks differ, two carry data
    raw[3 * BLOCK_SIZE:4 * BLOCK_SIZE] = rng.randbytes(BLOCK_SIZE)
    raw[6 * BLOCK_SIZE:7 * BLOCK_SIZE] = rng.randbytes(BLOCK_SIZE)
    raw[0:BLOCK_SIZE] = bytes(BLOCK_SIZE)
    img.write_bytes(raw)
    second = adopt_source(store, "web-vda", FullSource(img))
    assert (second["blocks_changed"], second["bytes"], second["reused"]) == (3, 2 * BLOCK_SIZE, False)
    assert disk.verify(second["point"]).ok
    ov = disk.materialize(second["point"], tmp_path / "ov.qcow2")
    try:
        r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(ov), str(img)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        disk.release(ov)
    # a smaller image never shrinks a replica
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(SIZE // 2))
    with pytest.raises(Exception, match="never shrinks"):
        adopt_source(store, "web-vda", FullSource(small))


def test_vm_prefix_in_the_configuration(tmp_path: Path) -> None:
    base: dict[str, Any] = dict(data_dir=tmp_path / "a", name="agent-b", server_url="https://127.0.0.1:8443",
                                site="s2", server="mgr", cloud="secondary", host="kvm-b", listen="127.0.0.1:7444")
    assert AgentConfig(**base).vm_prefix == ""
    cfg = AgentConfig(**base, vm_prefix="dr-")
    cfg.save()
    assert AgentConfig.load(tmp_path / "a").vm_prefix == "dr-"
    for bad in ("dr -", "-dr", "x" * 65, "a/b"):
        with pytest.raises(BadInput, match="VM prefix"):
            AgentConfig(**base, vm_prefix=bad)
    assert replica_vm_name("dr-", "demo-web") == "dr-demo-web"
    assert replica_vm_name("dr-", "demo-web", test=True) == "dr-demo-web-test"
    assert replica_vm_name("", "web") == "web"


def test_register_takes_a_vm_prefix() -> None:
    from typer.testing import CliRunner

    from standby.cli.agent_cmds import agent_app

    out = CliRunner().invoke(agent_app, ["register", "--help"])
    assert out.exit_code == 0 and "--vm-prefix" in out.output


def test_prune_keeps_the_points_named_in_keep(env: TaskEnv) -> None:
    """A committed failover's release of older points (prune, retention 0) keeps its point."""
    rng = random.Random(9)
    p1, p2, p3 = (_commit(env.store, "web-vda", rng.randbytes(SIZE)) for _ in range(3))
    q1, q2 = (_commit(env.store, "web-vdb", rng.randbytes(SIZE)) for _ in range(2))
    bad = execute(env, {"id": 1, "kind": "prune", "params": {"disk_ids": ["web-vda"], "keep": ["x"]}})
    assert not bad.ok and bad.error_type == "BadInput", bad
    out = execute(env, {"id": 2, "kind": "prune", "params": {"disk_ids": ["web-vda", "web-vdb"], "retention_hours": 0,
                                                             "keep": {"web-vda": p1}}})
    assert out.ok, out
    assert out.result["removed"] == {"web-vda": [p2], "web-vdb": [q1]}
    assert [p.id for p in env.store.disk("web-vda").points()] == [p1, p3]
    assert [p.id for p in env.store.disk("web-vdb").points()] == [q2]


def test_a_vm_task_sends_the_inventory_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a VM task the control plane hears of the VM's state at once (the failover
    workflow reads the inventory), not at the next inventory interval; other tasks do not
    trigger it. The runtime against the recording HTTP server of test_agent_dispatch.py,
    the task functions replaced by instant ones (the runtime is under test, not them)."""
    import test_agent_dispatch as td

    from standby.agent import tasks as tasks_mod

    monkeypatch.setitem(tasks_mod.DISPATCH, "stop_vm", lambda env, params, progress: {"power_state": "shut-off"})
    monkeypatch.setitem(tasks_mod.DISPATCH, "list_points", lambda env, params, progress: {"points": {}})
    api = td._Api()
    try:
        rt = td._started_runtime(tmp_path, api, 5.0)
        calls: list[int] = []
        rt.sync_inventory_soon = lambda: calls.append(1)
        try:
            for task_id, kind, want in ((7, "list_points", []), (8, "stop_vm", [1])):
                api.claims.append({"id": task_id, "kind": kind, "params": {}, "attempt": 1,
                                   "created_at": "2026-01-01T00:00:00Z"})
                deadline = time.monotonic() + 10
                while not any(p.endswith(f"/tasks/{task_id}/result") for _, p, _ in api.got):
                    assert time.monotonic() < deadline, api.got
                    time.sleep(0.05)
                assert calls == want, kind
        finally:
            rt.stop()
    finally:
        api.close()
