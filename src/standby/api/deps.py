"""What the routes share: the running services, and the ORM-row -> response conversions.

Rows are converted inside the session that loaded them (relationships are loaded lazily),
so a route returns plain response models, never ORM objects.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from fastapi import Request

from standby.api import schemas
from standby.orchestration import agents as agents_svc
from standby.orchestration.settings import ServerSettings
from standby.store.db import Store
from standby.store.models import (
    Agent,
    Alert,
    Cloud,
    CloudPairing,
    Host,
    Job,
    Network,
    NetworkMapping,
    Policy,
    ProtectedItem,
    Server,
    Vm,
    Webhook,
)


if TYPE_CHECKING:
    from standby.orchestration.desired import ChangeNotifier
    from standby.orchestration.runner import JobRunner
    from standby.orchestration.scheduler import Scheduler


class Services(Protocol):
    """What the API needs of the control plane's services (`orchestration.service`)."""

    settings: ServerSettings
    store: Store
    runner: JobRunner
    scheduler: Scheduler
    desired: ChangeNotifier  # counts the commits that may change an agent's desired state

    def start(self) -> None: ...

    def stop(self) -> None: ...


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def store(request: Request) -> Store:
    return request.app.state.services.store


def settings(request: Request) -> ServerSettings:
    return request.app.state.services.settings


# ---------------------------------------------------------------- conversions


def heartbeat_ok(agent: Agent, settings: ServerSettings, now: datetime) -> bool:
    return agents_svc.alive(agent, settings, now)


def agent_out(agent: Agent, settings: ServerSettings, now: datetime) -> schemas.AgentOut:
    return schemas.AgentOut(
        id=agent.id,
        name=agent.name,
        kind=agent.kind,
        host_name=agent.host_name,
        address=agent.address,
        version=agent.version,
        state=agent.state,
        cert_fingerprint=agent.cert_fingerprint,
        cert_not_after=agent.cert_not_after,
        registered_at=agent.registered_at,
        last_heartbeat_at=agent.last_heartbeat_at,
        heartbeat_ok=heartbeat_ok(agent, settings, now),
        facts=agent.facts or {},
    )


def server_out(server: Server) -> schemas.ServerOut:
    return schemas.ServerOut(
        id=server.id,
        name=server.name,
        site=server.site.name,
        platform=server.platform,
        version=server.version,
        created_at=server.created_at,
    )


def cloud_out(cloud: Cloud) -> schemas.CloudOut:
    return schemas.CloudOut(
        id=cloud.id,
        name=cloud.name,
        server=cloud.server.name,
        capabilities=list(cloud.capabilities or []),
        hosts=[h.name for h in cloud.hosts],
        synced_at=cloud.synced_at,
    )


def host_out(host: Host, server_names: dict[int, str]) -> schemas.HostOut:
    return schemas.HostOut(
        id=host.id,
        name=host.name,
        server=server_names.get(host.server_id) if host.server_id is not None else None,
        host_group=host.host_group,
        platform=host.platform,
        replication_address=host.replication_address,
        storage_free_bytes=host.storage_free_bytes,
        facts=host.facts or {},
        synced_at=host.synced_at,
    )


def vm_out(vm: Vm, item_ids: dict[int, int]) -> schemas.VmOut:
    return schemas.VmOut(
        id=vm.id,
        name=vm.name,
        host=vm.host.name,
        uuid=vm.uuid,
        power_state=vm.power_state,
        disks=vm.disks or {},
        nics=list(vm.nics or []),
        missing_since=vm.missing_since,
        synced_at=vm.synced_at,
        protected_item_id=item_ids.get(vm.id),
    )


def network_out(net: Network) -> schemas.NetworkOut:
    return schemas.NetworkOut(
        id=net.id, name=net.name, site=net.site.name if net.site is not None else None, created_at=net.created_at
    )


def policy_out(policy: Policy) -> schemas.PolicyOut:
    data = {name: getattr(policy, name) for name in schemas.PolicyOut.model_fields if hasattr(policy, name)}
    data["pairings"] = [p.id for p in policy.pairings]
    return schemas.PolicyOut.model_validate(data)


def pairing_out(pairing: CloudPairing) -> schemas.PairingOut:
    return schemas.PairingOut(
        id=pairing.id,
        primary_cloud=pairing.primary.name,
        secondary_cloud=pairing.secondary.name,
        policies=[p.name for p in pairing.policies],
        bandwidth=pairing.bandwidth_schedule,
        created_at=pairing.created_at,
    )


def mapping_out(mapping: NetworkMapping) -> schemas.MappingOut:
    return schemas.MappingOut(
        id=mapping.id, primary=mapping.primary.name, secondary=mapping.secondary.name, created_at=mapping.created_at
    )


def current_rpo(item: ProtectedItem, now: datetime | None = None) -> float | None:
    """The RPO now: the age of the latest recovery point (what the scheduler judges health
    by), not the value stored when the last cycle ended."""
    at = item.last_recovery_point_at
    if at is None:
        return None
    if at.tzinfo is None:  # SQLite hands back naive UTC
        at = at.replace(tzinfo=UTC)
    return max(0.0, ((now or datetime.now(UTC)) - at).total_seconds())


def item_out(item: ProtectedItem) -> schemas.ItemOut:
    return schemas.ItemOut(
        id=item.id,
        vm=item.vm.name,
        vm_id=item.vm_id,
        host=item.vm.host.name,
        primary_cloud=item.pairing.primary.name,
        secondary_cloud=item.pairing.secondary.name,
        policy=item.policy.name,
        secondary_host=item.secondary_host.name if item.secondary_host is not None else None,
        state=item.state,
        state_changed_at=item.state_changed_at,
        health=item.health,
        health_reason=item.health_reason,
        rpo_seconds=current_rpo(item),
        last_recovery_point_id=item.last_recovery_point_id,
        last_recovery_point_at=item.last_recovery_point_at,
        bytes_replicated=item.bytes_replicated,
        last_cycle_at=item.last_cycle_at,
        next_cycle_at=item.next_cycle_at,
        error=item.error,
        details=item.details or {},
        created_at=item.created_at,
        updated_at=item.updated_at,
    )


def job_out(job: Job) -> schemas.JobOut:
    return schemas.JobOut.model_validate(job)


def alert_out(alert: Alert) -> schemas.AlertOut:
    return schemas.AlertOut.model_validate(alert)


def webhook_out(hook: Webhook) -> schemas.WebhookOut:
    return schemas.WebhookOut(
        id=hook.id,
        name=hook.name,
        url=hook.url,
        has_secret=bool(hook.secret),
        enabled=hook.enabled,
        kinds=[str(k) for k in hook.kinds or []],
        min_severity=hook.min_severity,
        created_at=hook.created_at,
    )
