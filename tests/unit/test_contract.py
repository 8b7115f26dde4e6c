"""Task parameters as typed in standby.contract: what the control plane builds, the agent reads."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel

from standby.agent.tasks import DISPATCH
from standby.contract import (
    AdoptDiskParams,
    CycleParams,
    DefineVmParams,
    DiskIdsParams,
    MaterializeParams,
    NamedParams,
    PruneParams,
    ReleaseParams,
    RestoreDiskParams,
    SeedExportParams,
    SeedImportParams,
    StartVmParams,
    StopVmParams,
    VmParams,
    build_params,
    parse_params,
    prune_params,
)
from standby.errors import BadInput

PEER = {"name": "agent-b", "address": "10.0.0.2:7443"}
RECOVERY = {"network_map": {"prod": "dr-prod", "backup": None}, "policy": {"name": "p", "retention_hours": 24}}

# Each kind's parameters as the control plane builds them (orchestration/failover.py, plans.py,
# protection.py, scheduler.py, api/routes/items.py).
BUILT: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "cycle": (CycleParams, {"item_id": 7, "vm": "web01", "peer": PEER, "consistency": "crash", "compress": True,
                            "force_hash_scan": False, "timeout_seconds": 60, "recovery": RECOVERY,
                            "final_sync": True, "disk_ids": {"vda": "web01-vda"}}),
    "prune": (PruneParams, {"disk_ids": ["web01-vda"], "retention_hours": 0, "app_consistent_interval_hours": 0,
                            "keep": {"web01-vda": "0000000001"}}),
    "delete_replica": (DiskIdsParams, {"disk_ids": ["web01-vda", "web01-vdb"]}),
    "list_points": (DiskIdsParams, {"disk_ids": ["web01-vda"]}),
    "seed_export": (SeedExportParams, {"vm": "web01", "disk_ids": ["web01-vda"], "path": "/seed/out"}),
    "seed_import": (SeedImportParams, {"vm": "web01", "disk_ids": ["web01-vda"], "path": "/seed/in"}),
    "materialize": (MaterializeParams, {"vm": "web01", "disk_ids": {"vda": "web01-vda"},
                                        "point": {"web01-vda": "0000000001"}, "purpose": "test", "tag": "test-7"}),
    "release": (ReleaseParams, {"tag": "failover-7"}),
    "define_vm": (DefineVmParams, {"name": "dr-web01", "template_xml": "<domain/>",
                                   "disks": {"vda": "/overlays/test-7/vda.qcow2"}, "networks": ["sb-test-7", None],
                                   "isolated_network": "sb-test-7"}),
    "start_vm": (StartVmParams, {"name": "dr-web01", "timeout_seconds": 120.0, "autostart": True}),
    "stop_vm": (StopVmParams, {"name": "web01", "disable_autostart": True, "timeout_seconds": 120.0}),
    "undefine_vm": (VmParams, {"name": "dr-web01", "timeout_seconds": 120.0}),
    "create_network": (NamedParams, {"name": "sb-test-7"}),
    "delete_network": (NamedParams, {"name": "sb-test-7"}),
    "adopt_disk": (AdoptDiskParams, {"disk_id": "web01-vda", "image": "/var/lib/libvirt/images/web01.qcow2"}),
    "restore_disk": (RestoreDiskParams, {"disk_id": "web01-vda", "point": "0000000002",
                                         "image": "/var/lib/libvirt/images/web01.qcow2"}),
}


def test_every_task_kind_has_a_model() -> None:
    assert set(BUILT) == set(DISPATCH)


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_what_the_control_plane_builds_the_agent_reads(kind: str) -> None:
    model, fields = BUILT[kind]
    wire = build_params(model, **fields)
    # the wire carries the fields given, nothing more (an older agent reads the same keys)
    assert wire == fields
    assert parse_params(model, wire).model_dump(mode="json", exclude_unset=True) == wire


def test_nulls_are_left_out_of_the_wire() -> None:
    wire = build_params(RestoreDiskParams, disk_id="web01-vda", point=None, image="/x.qcow2")
    assert wire == {"disk_id": "web01-vda", "image": "/x.qcow2"}
    assert parse_params(RestoreDiskParams, wire).point is None


def test_prune_params_are_a_prune_tasks() -> None:
    wire = prune_params(["web01-vda"], 1, 0, 120)
    assert parse_params(PruneParams, wire).retention_hours == 2


@pytest.mark.parametrize(("model", "params", "field"), [
    (ReleaseParams, {"tag": "-starts-with-a-dash"}, "'tag'"),
    (ReleaseParams, {"tag": "a/b"}, "'tag'"),
    (ReleaseParams, {"tag": "x" * 129}, "'tag'"),
    (ReleaseParams, {}, "'tag'"),
    (AdoptDiskParams, {"disk_id": "web01-vda", "image": "relative.qcow2"}, "'image'"),
    (RestoreDiskParams, {"disk_id": "web01-vda", "image": ""}, "'image'"),
    (StopVmParams, {"name": "web01", "timeout_seconds": 86401}, "'timeout_seconds'"),
    (StopVmParams, {"name": "web01", "timeout_seconds": -1}, "'timeout_seconds'"),
    (StopVmParams, {"name": "web01", "timeout_seconds": "60"}, "'timeout_seconds'"),
    (StopVmParams, {"name": "web01", "force": "yes"}, "'force'"),
    (StopVmParams, {"name": "web01", "force": 1}, "'force'"),
    (StartVmParams, {"name": "web01", "autostart": None}, "'autostart'"),
    (MaterializeParams, {"vm": "web01", "disk_ids": {"vda": "d", "vdb": "d"}, "tag": "t"}, "'disk_ids'"),
    (MaterializeParams, {"vm": "web01", "disk_ids": {"eth0": "d"}, "tag": "t"}, "'disk_ids' (eth0)"),
    (MaterializeParams, {"vm": "web01", "disk_ids": {}, "tag": "t"}, "'disk_ids'"),
    (MaterializeParams, {"vm": "web01", "disk_ids": {"vda": "d"}, "point": {"e": "p"}, "tag": "t"}, "'point'"),
    (MaterializeParams, {"vm": "web01", "disk_ids": {"vda": "d"}, "purpose": "demo", "tag": "t"}, "'purpose'"),
    (DefineVmParams, {"name": "dr-web01", "disks": {"nic0": "/x.qcow2"}}, "'disks' (nic0)"),
    (DefineVmParams, {"name": "dr-web01", "disks": {"vda": "/x"}, "template_xml": "  "}, "'template_xml'"),
    (DefineVmParams, {"name": "dr-web01", "disks": {"vda": "/x"}, "networks": [""]}, "'networks'"),
    (NamedParams, {"name": "a/b"}, "'name'"),
    (NamedParams, {"name": " web01"}, "'name'"),
    (VmParams, {"name": "x" * 201}, "'name'"),
    (AdoptDiskParams, {"disk_id": "../escape", "image": "/x"}, "'disk_id'"),
    (DiskIdsParams, {"disk_ids": []}, "'disk_ids'"),
    (DiskIdsParams, {"disk_ids": "web01-vda"}, "'disk_ids'"),
    (DiskIdsParams, {"disk_ids": ["web01 vda"]}, "'disk_ids'"),
    (PruneParams, {"disk_ids": ["d"], "retention_hours": True}, "'retention_hours'"),
    (PruneParams, {"disk_ids": ["d"], "keep": {"d": ""}}, "'keep'"),
    (SeedImportParams, {"disk_ids": ["d"]}, "'path'"),
    (CycleParams, {"vm": "web01", "peer": PEER, "compress": 3}, "'compress':"),
    (CycleParams, {"vm": "web01", "peer": PEER, "compress": "yes"}, "'compress':"),
    (CycleParams, {"vm": "web01", "peer": PEER, "disk_ids": ["web01-vda"]}, "'disk_ids'"),
    (CycleParams, {"vm": "web01", "peer": {"address": "x:1"}}, "'peer' (name)"),
])
def test_bad_parameters_are_bad_input_naming_the_parameter(model: type[BaseModel], params: dict[str, Any],
                                                           field: str) -> None:
    with pytest.raises(BadInput, match=f"^task parameter {re.escape(field)}[: ]"):
        parse_params(model, params)
    with pytest.raises(BadInput, match=f"^task parameter {re.escape(field)}[: ]"):
        build_params(model, **params)  # the control plane refuses what the agent would


def test_duplicate_disk_ids_in_a_list_are_dropped() -> None:
    assert parse_params(DiskIdsParams, {"disk_ids": ["b", "a", "b"]}).disk_ids == ["b", "a"]


def test_defaults_and_a_null_timeout() -> None:
    p = parse_params(StopVmParams, {"name": "web01", "timeout_seconds": None})
    assert (p.timeout_seconds, p.force, p.disable_autostart) == (60.0, False, False)
    assert parse_params(MaterializeParams, {"vm": "v", "disk_ids": {"vda": "d"}, "tag": "t"}).purpose == "failover"


@pytest.mark.parametrize(("compress", "mode"), [(True, "auto"), (None, "auto"), (False, "off"), ("on", "on")])
def test_compress_mode(compress: Any, mode: str) -> None:
    assert parse_params(CycleParams, {"vm": "v", "peer": PEER, "compress": compress}).compress_mode == mode


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_unknown_fields_are_ignored(kind: str) -> None:
    model, fields = BUILT[kind]
    p = parse_params(model, {**fields, "added_by_a_newer_control_plane": {"x": 1}})
    assert "added_by_a_newer_control_plane" not in p.model_dump()
