"""The VM manifest a recovery point carries (domain/vm_point.py): built, read back, and
refused with the field at fault."""

from __future__ import annotations

import pytest

from standby.domain import vm_point
from standby.domain.vm_point import BadManifest

XML = "<domain type='qemu'><name>web01</name></domain>"


def _built() -> vm_point.VmManifest:
    return vm_point.build("web01", "standby-7", {"vda": "web01-vda", "vdb": "web01-vdb"}, XML,
                          nics=[("52:54:00:aa:bb:01", "prod"), ("52:54:00:aa:bb:02", "backup"),
                                ("52:54:00:aa:bb:03", None)],
                          network_map={"prod": "dr-prod"}, policy={"name": "gold"}, item_id=7)


def test_a_manifest_round_trips_and_maps_each_nic() -> None:
    m = _built()
    back = vm_point.of_meta({"vm_point": m.as_dict(), "checkpoint": "standby-7"})
    assert back == m and back is not None and back.startable
    assert back.secondary_networks() == ["dr-prod", None, None]  # unmapped and unattached NICs stay off
    assert vm_point.of_meta({"checkpoint": "standby-7"}) is None  # a point from before manifests


@pytest.mark.parametrize("change, field", [
    ({"format": "standby-vm-point/9"}, "format"),
    ({"vm": ""}, "'vm'"),
    ({"cycle": None}, "'cycle'"),
    ({"disks": {}}, "'disks'"),
    ({"disks": {"eth0": "x"}}, "eth0"),
    ({"disks": {"vda": 3}}, "vda"),
    ({"domain_xml": "<network/>"}, "domain_xml"),
    ({"domain_xml": "<domain>" + "x" * vm_point.MAX_DOMAIN_XML}, "domain_xml"),
    ({"networks": {"prod": "dr"}}, "'networks'"),
    ({"networks": [{"mac": "nope"}]}, "networks[0].mac"),
    ({"networks": [{"mac": None, "primary": 5}]}, "networks[0].primary"),
    ({"policy": []}, "'policy'"),
    ({"item_id": "7"}, "'item_id'"),
    ({"item_id": True}, "'item_id'"),
])
def test_a_bad_manifest_names_its_field(change: dict, field: str) -> None:
    raw = {**_built().as_dict(), **change}
    with pytest.raises(BadManifest, match=field.replace("[", r"\[").replace("]", r"\]")):
        vm_point.parse(raw)


def test_a_definition_too_big_to_carry_is_left_out_not_cut() -> None:
    m = vm_point.build("big", "c1", {"vda": "big-vda"}, "<domain>" + "x" * vm_point.MAX_DOMAIN_XML + "</domain>")
    assert m.domain_xml is None and not m.startable
