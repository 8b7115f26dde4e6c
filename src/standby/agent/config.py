"""The agent's configuration: `A/agent.json` in its data directory, written by `standby
agent register` and read by `standby agent run`.

It holds what the agent was registered as (name, site, server, cloud, host, host group),
where the control plane is, where its replication receiver listens, which libvirt host it
drives and which of that host's domains it owns (glob patterns; two agents may share one
libvirtd on a single-machine demo, each owning its own VMs). It holds no secret: the
registration key is never written anywhere, and the private key is `A/agent.key` (0600).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from standby.errors import BadInput, NotFound

CONFIG_FILE = "agent.json"
FORMAT = "standby-agent/1"
DEFAULT_LIBVIRT_URI = "qemu:///system"
DEFAULT_HEARTBEAT_SECONDS = 10.0

# What the control plane accepts (orchestration/registration.py): a certificate CN, a file
# name and a fabric name at once.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BadInput(f"{what} {value!r} is not a valid name (letters, digits and _.-, starting with a "
                       "letter or digit, at most 128 characters)")
    return value


_VM_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_vm_prefix(value: str) -> str:
    """A prefix of libvirt domain names: empty, or letters, digits and _.- (at most 64)."""
    if not isinstance(value, str) or (value and not _VM_PREFIX.fullmatch(value)):
        raise BadInput(f"VM prefix {value!r} is not valid (empty, or letters, digits and _.-, starting with a "
                       "letter or digit, at most 64 characters)")
    return value


def replica_vm_name(prefix: str, vm: str, *, test: bool = False) -> str:
    """The name of a VM's replica (or test failover VM) on an agent with `prefix`."""
    return f"{prefix}{vm}-test" if test else f"{prefix}{vm}"


def check_listen(value: str) -> str:
    """A replication address HOST:PORT (port 1..65535: peers dial it, so it cannot be 'any')."""
    from standby.replication.sender import Endpoint

    Endpoint.parse(value)
    return value


def check_server_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise BadInput(f"control plane URL {value!r} is not https://HOST[:PORT]")
    return value.rstrip("/")


@dataclass
class AgentConfig:
    data_dir: Path
    name: str
    server_url: str
    site: str
    server: str
    cloud: str
    host: str
    listen: str  # HOST:PORT the receiver listens on; also the address peers dial
    host_group: str | None = None
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    domains: list[str] = field(default_factory=list)  # globs; empty: every domain of the host
    agent_id: int | None = None
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    # Replica VMs this agent defines are named <vm_prefix><vm> (test VMs <vm_prefix><vm>-test):
    # two agents sharing one libvirtd (the single-machine demo) keep their VMs apart by it.
    vm_prefix: str = ""
    # The other control planes of the deployment (the standby at the other site): the agent
    # follows whichever is active, with no change here when one is promoted.
    standby_urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        check_name(self.name, "agent name")
        for what in ("site", "server", "cloud", "host"):
            check_name(getattr(self, what), what)
        if self.host_group is not None:
            check_name(self.host_group, "host group")
        self.server_url = check_server_url(self.server_url)
        if not isinstance(self.standby_urls, list):
            raise BadInput(f"standby_urls must be a list of control plane URLs, not {self.standby_urls!r}")
        self.standby_urls = [check_server_url(u) for u in self.standby_urls]
        if self.server_url in self.standby_urls or len(set(self.standby_urls)) != len(self.standby_urls):
            raise BadInput("a control plane URL is given twice")
        check_listen(self.listen)
        if not self.libvirt_uri:
            raise BadInput("libvirt URI is empty")
        if not isinstance(self.domains, list) or not all(isinstance(g, str) and g for g in self.domains):
            raise BadInput(f"domain filter must be a list of non-empty glob patterns, not {self.domains!r}")
        if not (isinstance(self.heartbeat_seconds, (int, float)) and self.heartbeat_seconds > 0):
            raise BadInput(f"heartbeat_seconds must be positive, not {self.heartbeat_seconds!r}")
        check_vm_prefix(self.vm_prefix)

    @property
    def urls(self) -> list[str]:
        """Every control plane this agent may talk to, the one it registered with first."""
        return [self.server_url, *self.standby_urls]

    # ------------------------------------------------------------------ files

    @property
    def path(self) -> Path:
        return self.data_dir / CONFIG_FILE

    @property
    def key_path(self) -> Path:
        return self.data_dir / "agent.key"

    @property
    def cert_path(self) -> Path:
        return self.data_dir / "agent.crt"

    @property
    def ca_path(self) -> Path:
        return self.data_dir / "ca.crt"

    @property
    def replicas_dir(self) -> Path:
        return self.data_dir / "replicas"

    @property
    def state_dir(self) -> Path:
        """Per-VM replication state of this agent as a primary (`replicate_vm`'s state_dir)."""
        return self.data_dir / "state"

    @property
    def tracking_dir(self) -> Path:
        """The libvirt driver's change-tracking state (checkpoint XML per VM)."""
        return self.data_dir / "state" / "tracking"

    @property
    def listen_host(self) -> str:
        from standby.replication.sender import Endpoint

        return Endpoint.parse(self.listen).host

    @property
    def listen_port(self) -> int:
        from standby.replication.sender import Endpoint

        return Endpoint.parse(self.listen).port

    def owns(self, vm: str) -> bool:
        """Whether a domain of the libvirt host is this agent's (the --domains globs)."""
        return not self.domains or any(fnmatch.fnmatchcase(vm, g) for g in self.domains)

    # ------------------------------------------------------------------ load / save

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("data_dir")
        return {"format": FORMAT, **d}

    def save(self) -> Path:
        """Write agent.json atomically (temp file, fsync, rename)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return self.path

    @classmethod
    def load(cls, data_dir: Path | str) -> AgentConfig:
        data_dir = Path(data_dir)
        path = data_dir / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist: register this agent first (`standby agent register "
                           f"--data-dir {data_dir} ...`)") from None
        except (OSError, ValueError) as exc:
            raise BadInput(f"{path}: cannot read the agent configuration: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BadInput(f"{path}: not an agent configuration of format {FORMAT}")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "data_dir"}
        missing = [k for k in ("name", "server_url", "site", "server", "cloud", "host", "listen") if k not in known]
        if missing:
            raise BadInput(f"{path}: missing {', '.join(missing)}")
        try:
            return cls(data_dir=data_dir, **known)
        except TypeError as exc:
            raise BadInput(f"{path}: {exc}") from None
