"""What the control plane does when an agent reports in: heartbeats and inventory.

Registration (`orchestration.registration.register`) stores the agent's place in the
fabric in `agent.facts` (`site`, `server`, `cloud`, `host_group`); these functions read
it from there and never let a report overwrite it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from standby.domain.health import heard_from
from standby.errors import BadInput, Refused
from standby.store.models import Agent, Host, Vm, cloud_hosts
from standby.store.repo import alerts, inventory
from standby.store.repo._common import now_or
from standby.store.repo.inventory import HostReport, SyncResult, VmReport

HEARTBEAT_LOST = "heartbeat_lost"
# Keys registration owns in agent.facts; reports land beside them, never over them.
REGISTRATION_FACTS = ("site", "server", "cloud", "host_group")


if TYPE_CHECKING:
    from standby.orchestration.settings import ServerSettings


def agent_subject(name: str) -> str:
    return f"agent:{name}"


def alive(agent: Agent, settings: ServerSettings, now: datetime) -> bool:
    """An active agent heard from recently (`domain.health.heard_from`, with the grace a
    control plane gives agents after its own start)."""
    return agent.state == "active" and heard_from(
        agent.last_heartbeat_at or agent.registered_at, now, timedelta(seconds=settings.heartbeat_timeout),
        settings.started_at)


def heartbeat(
    session: Session,
    agent: Agent,
    *,
    version: str,
    storage_free_bytes: int | None,
    storage_total_bytes: int | None,
    facts: Mapping[str, Any] | None,
    now: datetime | None = None,
) -> Agent:
    """Record a heartbeat: the agent is alive (its heartbeat_lost alert, if any, clears),
    its version, its replica storage and whatever else it reports (`facts["reported"]`)."""
    if agent.state != "active":
        raise Refused(f"agent {agent.name!r} is {agent.state}: register it again")
    for label, value in (("storage_free_bytes", storage_free_bytes), ("storage_total_bytes", storage_total_bytes)):
        if value is not None and value < 0:
            raise BadInput(f"{label} cannot be negative")
    if storage_free_bytes is not None and storage_total_bytes is not None and storage_free_bytes > storage_total_bytes:
        raise BadInput("storage_free_bytes cannot exceed storage_total_bytes")
    now = now_or(now)
    agent.last_heartbeat_at = now
    agent.version = version
    kept = {k: agent.facts[k] for k in REGISTRATION_FACTS if k in (agent.facts or {})}
    agent.facts = {
        **(agent.facts or {}),
        "reported": dict(facts or {}),
        "storage_free_bytes": storage_free_bytes,
        "storage_total_bytes": storage_total_bytes,
        **kept,
    }
    # Replica placement picks the host with the most free storage: keep it current.
    if storage_free_bytes is not None:
        host = session.scalars(select(Host).where(Host.name == agent.host_name)).one_or_none()
        if host is not None:
            host.storage_free_bytes = storage_free_bytes
    alerts.clear_alert(session, kind=HEARTBEAT_LOST, subject=agent_subject(agent.name), now=now)
    session.flush()
    return agent


def owns_cycles(agent: Agent) -> bool:
    """Whether the agent runs its replication cycles itself, from its desired state (it
    says so in its heartbeat's facts); older agents get cycle tasks instead."""
    reported = (agent.facts or {}).get("reported") or {}
    return bool(reported.get("owns_cycles"))


def storage_free_fraction(agent: Agent) -> float | None:
    """The free fraction of the agent's replica storage, from its last heartbeat."""
    facts = agent.facts or {}
    free, total = facts.get("storage_free_bytes"), facts.get("storage_total_bytes")
    if not isinstance(free, int) or not isinstance(total, int) or total <= 0:
        return None
    return max(0.0, min(1.0, free / total))


def _vm_report(raw: Mapping[str, Any]) -> VmReport:
    return VmReport(
        name=str(raw["name"]),
        uuid=raw.get("uuid"),
        power_state=raw.get("power_state"),
        disks=dict(raw.get("disks") or {}),
        nics=list(raw.get("nics") or []),
        digest=raw.get("digest"),
    )


def _host_report(raw: Mapping[str, Any]) -> HostReport:
    try:
        return HostReport(
            name=str(raw["name"]),
            platform=str(raw.get("platform") or "kvm"),
            host_group=raw.get("host_group"),
            replication_address=raw.get("replication_address"),
            storage_free_bytes=raw.get("storage_free_bytes"),
            facts=dict(raw.get("facts") or {}),
            vms=[_vm_report(v) for v in raw.get("vms") or []],
            digest=raw.get("digest"),
            brief=bool(raw.get("brief")),
            vm_digests=dict(raw.get("vm_digests") or {}),
        )
    except KeyError as e:
        raise BadInput(f"inventory entry without {e.args[0]!r}") from None


def sync_inventory(
    session: Session, agent: Agent, hosts_payload: Sequence[Mapping[str, Any]], *, now: datetime | None = None
) -> SyncResult:
    """Sync what the agent's discovery reports into the agent's cloud: its hosts and their
    VMs (`inventory.sync_hosts`: the cloud's other hosts are not read). With one agent per
    host, each agent reports only its own host; a host of the cloud that no active agent
    runs on and this report does not name leaves the cloud, as a full sync would drop it.
    One agent's report never touches its neighbours."""
    cloud_name = (agent.facts or {}).get("cloud")
    if not isinstance(cloud_name, str) or not cloud_name:
        raise Refused(f"agent {agent.name!r} has no cloud on record: register it again")
    reports = [_host_report(h) for h in hosts_payload]
    reported = {r.name for r in reports}
    cloud = inventory.get_cloud(session, cloud_name)
    other_agent_hosts = set(
        session.scalars(
            select(Agent.host_name).where(Agent.state == "active", Agent.kind == "agent", Agent.id != agent.id)
        )
    )
    members = session.execute(
        select(Host.id, Host.name).join(cloud_hosts, cloud_hosts.c.host_id == Host.id)
        .where(cloud_hosts.c.cloud_id == cloud.id)
    )
    drop = [host_id for host_id, name in members if name not in reported and name not in other_agent_hosts]
    return inventory.sync_hosts(session, cloud_name, reports, drop_host_ids=drop, now=now)



# Where the production VM runs on the secondary and must not run on the primary: a primary
# agent keeps these VMs off (`fenced_vms`): a site that comes back after a disaster, its
# VMs still defined and perhaps set to start with the host, never runs one beside its
# replica.
FENCED_STATES = ("commit_pending", "failed_over", "reverse_replicating")
FENCE_ALERT = "source_fenced"


def fenced_vms(session: Session, agent: Agent) -> list[str]:
    """The VMs of this agent's host that failed over: it must keep them shut down."""
    from standby.store.models import ProtectedItem

    q = (select(Vm.name).join(ProtectedItem, ProtectedItem.vm_id == Vm.id).join(Host, Host.id == Vm.host_id)
         .where(Host.name == agent.host_name, ProtectedItem.state.in_(FENCED_STATES)).order_by(Vm.name))
    return list(session.scalars(q))


def record_fenced(session: Session, agent: Agent, vm: str, *, was_running: bool, autostart_was: bool | None,
                  now: datetime | None = None) -> None:
    """An agent stopped (or kept off) a failed-over VM on its host: say so with an alert."""
    from standby.store.models import ProtectedItem

    item = session.scalars(select(ProtectedItem).join(Vm, Vm.id == ProtectedItem.vm_id).join(
        Host, Host.id == Vm.host_id).where(Vm.name == vm, Host.name == agent.host_name)).first()
    if item is None or item.state not in FENCED_STATES:
        raise Refused(f"VM {vm} on host {agent.host_name} is not failed over: nothing to fence")
    what = ("was running on its old host after the failover and was shut down" if was_running
            else "is kept shut down on its old host")
    auto = " (its autostart was on: turned off)" if autostart_was else ""
    alerts.raise_alert(session, kind=FENCE_ALERT, severity="warning" if was_running else "info",
                       subject=f"item:{vm}", item_id=item.id, agent_id=agent.id, now=now_or(now),
                       message=f"{vm} {what} by agent {agent.name}{auto}: it runs on the secondary; reverse "
                               "replication overwrites what the old copy wrote since its last point")


def record_replication(session: Session, agent: Agent, *, desired_version: str | None, active: list[int],
                       running: list[int], now: datetime | None = None) -> None:
    """What an agent that owns its cycles says it replicates now (its reports): the
    desired state it runs under, the items it cycles and those with a cycle in flight.
    A failover waits on this before it switches a VM (`replication_stopped`)."""
    agent.facts = {**(agent.facts or {}), "replication": {
        "desired_version": desired_version, "active": sorted(set(active))[:100000],
        "running": sorted(set(running))[:100000], "at": now_or(now).isoformat()}}


def replication_stopped(agent: Agent, item_id: int, since: datetime) -> bool:
    """Whether the agent reported, after `since`, that it no longer replicates the item
    and has no cycle of it in flight."""
    rep = (agent.facts or {}).get("replication") or {}
    at = rep.get("at")
    if not at:
        return False
    try:
        when = datetime.fromisoformat(str(at))
    except ValueError:
        return False
    return when >= since and item_id not in (rep.get("active") or []) and item_id not in (rep.get("running") or [])
