"""The operator's intent: replication policies, cloud pairings (and the policies
associated with them) and network mappings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response, status

from standby.api import deps, schemas
from standby.api.auth import authorize
from standby.errors import BadInput
from standby.store.db import Store
from standby.store.repo import policies as policies_repo

router = APIRouter(dependencies=[Depends(authorize)])

# Settings an update may set to null (the others always have a value).
NULLABLE_SETTINGS = frozenset(
    {"initial_replication_at", "offline_export_path", "offline_import_path", "rpo_alert_seconds"}
)


def _settings(body: schemas.PolicySettings, *, explicit_nulls: bool) -> dict[str, Any]:
    """The settings the request gives. On create a null means "the default"; on update an
    explicit null clears a nullable setting and is refused for the others."""
    out: dict[str, Any] = {}
    for name, value in body.model_dump(exclude_unset=True, exclude={"name"}).items():
        if value is None:
            if not explicit_nulls:
                continue
            if name not in NULLABLE_SETTINGS:
                raise BadInput(f"policy setting {name} cannot be null")
        out[name] = value
    return out


# ---------------------------------------------------------------- policies


@router.post("/policies", status_code=status.HTTP_201_CREATED, response_model=schemas.PolicyOut, tags=["policies"])
def create_policy(body: schemas.PolicyIn, store: Store = Depends(deps.store)) -> schemas.PolicyOut:
    """A replication policy; settings left out take the defaults (copy every 5 minutes,
    latest point only, compression on, certificate authentication, initial replication now)."""
    with store.transaction() as s:
        return deps.policy_out(policies_repo.create_policy(s, body.name, **_settings(body, explicit_nulls=False)))


@router.get("/policies", response_model=schemas.ListOut[schemas.PolicyOut], tags=["policies"])
def list_policies(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.PolicyOut]:
    with store.read() as s:
        return schemas.ListOut(items=[deps.policy_out(p) for p in policies_repo.list_policies(s)])


@router.get("/policies/{name}", response_model=schemas.PolicyOut, tags=["policies"])
def get_policy(name: str, store: Store = Depends(deps.store)) -> schemas.PolicyOut:
    with store.read() as s:
        return deps.policy_out(policies_repo.get_policy(s, name))


@router.patch("/policies/{name}", response_model=schemas.PolicyOut, tags=["policies"])
def update_policy(name: str, body: schemas.PolicyPatch, store: Store = Depends(deps.store)) -> schemas.PolicyOut:
    """Change some settings; protected items pick them up at their next cycle."""
    with store.transaction() as s:
        return deps.policy_out(policies_repo.update_policy(s, name, **_settings(body, explicit_nulls=True)))


@router.delete("/policies/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["policies"])
def delete_policy(name: str, store: Store = Depends(deps.store)) -> Response:
    """Refused (409) while the policy protects items."""
    with store.transaction() as s:
        policies_repo.delete_policy(s, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- pairings


@router.post("/pairings", status_code=status.HTTP_201_CREATED, response_model=schemas.PairingOut, tags=["pairings"])
def pair_clouds(body: schemas.PairingIn, store: Store = Depends(deps.store)) -> schemas.PairingOut:
    """Pair a primary cloud with a secondary cloud, and associate a policy with the pairing."""
    with store.transaction() as s:
        pairing = policies_repo.pair_clouds(s, body.primary_cloud, body.secondary_cloud, bandwidth=body.bandwidth)
        if body.policy is not None:
            policies_repo.associate(s, body.policy, pairing.id)
        return deps.pairing_out(pairing)


@router.get("/pairings", response_model=schemas.ListOut[schemas.PairingOut], tags=["pairings"])
def list_pairings(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.PairingOut]:
    with store.read() as s:
        return schemas.ListOut(items=[deps.pairing_out(p) for p in policies_repo.list_pairings(s)])


@router.get("/pairings/{pairing_id}", response_model=schemas.PairingOut, tags=["pairings"])
def get_pairing(pairing_id: schemas.IdPath, store: Store = Depends(deps.store)) -> schemas.PairingOut:
    with store.read() as s:
        return deps.pairing_out(policies_repo.get_pairing(s, pairing_id))


@router.patch("/pairings/{pairing_id}", response_model=schemas.PairingOut, tags=["pairings"])
def update_pairing(pairing_id: schemas.IdPath, body: schemas.PairingPatch,
                   store: Store = Depends(deps.store)) -> schemas.PairingOut:
    """Set the pair's bandwidth schedule; its agents apply it within a second (their desired state)."""
    with store.transaction() as s:
        pairing = policies_repo.get_pairing(s, pairing_id)
        pairing.bandwidth_schedule = body.bandwidth
        s.flush()
        return deps.pairing_out(pairing)


@router.delete("/pairings/{pairing_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["pairings"])
def unpair(pairing_id: schemas.IdPath, store: Store = Depends(deps.store)) -> Response:
    """Refused (409) while the pairing has protected items."""
    with store.transaction() as s:
        policies_repo.unpair(s, pairing_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/pairings/{pairing_id}/policies", response_model=schemas.PairingOut, tags=["pairings"])
def associate_policy(
    pairing_id: schemas.IdPath, body: schemas.PairingPolicyIn, store: Store = Depends(deps.store)
) -> schemas.PairingOut:
    """Associate a policy with a pairing (again: no change)."""
    with store.transaction() as s:
        policies_repo.associate(s, body.policy, pairing_id)
        return deps.pairing_out(policies_repo.get_pairing(s, pairing_id))


@router.delete("/pairings/{pairing_id}/policies/{policy}", response_model=schemas.PairingOut, tags=["pairings"])
def dissociate_policy(pairing_id: schemas.IdPath, policy: str, store: Store = Depends(deps.store)) -> schemas.PairingOut:
    """Refused (409) while the policy protects items of this pairing."""
    with store.transaction() as s:
        policies_repo.dissociate(s, policy, pairing_id)
        pairing = policies_repo.get_pairing(s, pairing_id)
        s.expire(pairing, ["policies"])
        return deps.pairing_out(pairing)


# ---------------------------------------------------------------- network mappings


@router.post(
    "/network-mappings", status_code=status.HTTP_201_CREATED, response_model=schemas.MappingOut, tags=["pairings"]
)
def map_network(body: schemas.MappingIn, store: Store = Depends(deps.store)) -> schemas.MappingOut:
    with store.transaction() as s:
        return deps.mapping_out(policies_repo.map_network(s, body.primary, body.secondary))


@router.get("/network-mappings", response_model=schemas.ListOut[schemas.MappingOut], tags=["pairings"])
def list_mappings(store: Store = Depends(deps.store)) -> schemas.ListOut[schemas.MappingOut]:
    with store.read() as s:
        return schemas.ListOut(items=[deps.mapping_out(m) for m in policies_repo.list_mappings(s)])


@router.delete("/network-mappings/{primary}", status_code=status.HTTP_204_NO_CONTENT, tags=["pairings"])
def unmap_network(primary: str, store: Store = Depends(deps.store)) -> Response:
    with store.transaction() as s:
        policies_repo.unmap_network(s, primary)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
