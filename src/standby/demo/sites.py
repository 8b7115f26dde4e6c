"""Two sites on this machine, each with its own control plane, database and agent: the
topology that survives the loss of a site (docs/site-loss.md), for the site-loss demo and
tests.

    with TwoSiteDeployment(workdir) as d:
        d.start()                         # PostgreSQL primary + control plane cp-a (active)
                                          # at site a; hot standby + cp-b (passive) at site b
        d.add_agent("a", "host-a", cloud="primary", domains=["web-*"])
        d.add_agent("b", "host-b", cloud="secondary", domains=["dr-*"], vm_prefix="dr-")
        d.client("a").post("/policies", ...)
        d.lose_site("a")                  # every process of site a SIGKILLed, its links cut
        d.promote("b")                    # standby server promote: cp-b active
        d.restore_site("a")               # links back; site a's database rebuilt as a standby
                                          # of b's, cp-a passive, agent host-a back

Each site is a network namespace (`standby.testing.netns.TwoSites`): site a is 10.213.0.1,
site b 10.213.0.2 on the link between them; the operator (this process) reaches each
control plane on an admin link (10.213.1.2 and 10.213.2.2). PostgreSQL runs in the site's
namespace (durable; site b's a streaming replica of site a's over the link), and so do
the control plane and the agent, as real processes. The test guests themselves run under
the machine's one libvirtd (QEMU does not run inside the namespaces): losing a site
does not stop them, the caller powers them off (`libvirt destroy`), as the power loss would.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from standby.client import ApiClient
from standby.demo.local import DeploymentError, Process, standby_command
from standby.errors import StandbyError

T = TypeVar("T")

PORT = 8443
AGENT_PORT = 7443
SITE_ADDR = {"a": "10.213.0.1", "b": "10.213.0.2"}
SITE_NAME = {"a": "site-a", "b": "site-b"}
DB_NAME = "standby"


@dataclass
class SiteAgent:
    name: str
    site: str
    data_dir: Path
    cloud: str
    process: Process


@dataclass
class Site:
    key: str  # "a" or "b"
    cp_dir: Path
    cp_name: str
    pg: Any = None  # standby.testing.postgres.PgCluster
    admin_addr: str = ""
    cp: Process | None = None
    agents: dict[str, SiteAgent] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return SITE_ADDR[self.key]

    @property
    def url(self) -> str:
        """How agents (on either site) reach this site's control plane."""
        return f"https://{self.addr}:{PORT}"

    @property
    def admin_url(self) -> str:
        """How the operator (this process) reaches it."""
        return f"https://{self.admin_addr}:{PORT}"


class TwoSiteDeployment:
    def __init__(self, workdir: Path, *, tick_seconds: float = 0.5, heartbeat_timeout: float = 15.0,
                 heartbeat_seconds: float = 2.0, libvirt_uri: str = "qemu:///system") -> None:
        from standby.testing.netns import TwoSites

        self.workdir = Path(workdir).resolve()
        self.tick_seconds = tick_seconds
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_seconds = heartbeat_seconds
        self.libvirt_uri = libvirt_uri
        self.logs = self.workdir / "logs"
        self.net = TwoSites(prefix="sbs")
        self.sites = {k: Site(k, self.workdir / f"cp-{k}", f"cp-{k}") for k in ("a", "b")}
        self._clients: dict[str, ApiClient] = {}
        self.events: list[tuple[float, str]] = []  # (time, what) for the record

    # ------------------------------------------------------------------ helpers

    def ns(self, site: str) -> list[str]:
        return ["ip", "netns", "exec", self.net.ns[site]]

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))

    @property
    def ca(self) -> Path:
        return self.sites["a"].cp_dir / "ca" / "ca.crt"

    @property
    def token_file(self) -> Path:
        return self.sites["a"].cp_dir / "admin.token"

    def cli(self, site: str | None, *args: str, check: bool = True, url: str | None = None,
            timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """`standby ARGS` in the site's namespace (None: this machine's), for a control plane."""
        env = dict(os.environ)
        if url is not None:
            env.update(STANDBY_URL=url, STANDBY_CA=str(self.ca), STANDBY_TOKEN_FILE=str(self.token_file))
        prefix = self.ns(site) if site else []
        p = subprocess.run([*prefix, *standby_command(*args)], capture_output=True, text=True, env=env,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise DeploymentError(f"standby {' '.join(args)} exited {p.returncode}: "
                                  f"{p.stderr.strip() or p.stdout.strip()}")
        return p

    def client(self, site: str) -> ApiClient:
        """The operator's API client of a site's control plane (the admin token)."""
        c = self._clients.get(site)
        if c is None:
            c = self._clients[site] = ApiClient(self.sites[site].admin_url, token=self.token_file.read_text().strip(),
                                                ca=str(self.ca), timeout=30)
        return c

    def health(self, site: str) -> dict[str, Any] | None:
        try:
            h = self.client(site).get("/health")
        except StandbyError:
            return None
        return h if isinstance(h, dict) else None

    def wait_for(self, pred: Callable[[], T], timeout: float, what: str, *, interval: float = 0.5,
                 log: Process | None = None) -> T:
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}\n{log.tail() if log else ''}")
            time.sleep(interval)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        from standby.testing.postgres import PgCluster, find_pg_bindir, reason_unavailable

        why = reason_unavailable()
        if why:
            raise DeploymentError(why)
        bindir = find_pg_bindir()
        assert bindir is not None
        self.net.__enter__()
        for k, s in self.sites.items():
            s.admin_addr = self.net.admin_link(k)
        a, b = self.sites["a"], self.sites["b"]
        a.pg = PgCluster(bindir, listen=a.addr, prefix=self.ns("a"), replication=True, durable=True,
                         trust_net="10.213.0.0/24")
        a.pg.start().create_database(DB_NAME)
        b.pg = PgCluster(bindir, listen=b.addr, prefix=self.ns("b"), replication=True, durable=True,
                         trust_net="10.213.0.0/24")
        b.pg.start_standby(a.addr, a.pg.port)
        self._init_cp("a")
        self._start_cp("a")
        self._init_cp("b", ca_from=a.cp_dir / "ca")
        (b.cp_dir / "admin.token").write_bytes(self.token_file.read_bytes())  # replicated with the database
        os.chmod(b.cp_dir / "admin.token", 0o600)
        self._start_cp("b")
        self.note("deployment started: cp-a active, cp-b passive")

    def _db_url(self, site: str) -> str:
        return self.sites[site].pg.server().url(DB_NAME)

    def _init_cp(self, site: str, ca_from: Path | None = None) -> None:
        s = self.sites[site]
        args = ["server", "init", "--data-dir", str(s.cp_dir), "--listen", f"0.0.0.0:{PORT}", "--db",
                self._db_url(site), "--name", s.cp_name, "--public-url", s.url, "--san", s.addr, "--san",
                s.admin_addr]
        if ca_from is not None:
            args += ["--ca-from", str(ca_from)]
        self.cli(site, *args)

    def _start_cp(self, site: str, timeout: float = 60.0) -> None:
        s = self.sites[site]
        s.cp = Process(f"cp-{site}", [*self.ns(site), *standby_command(
            "server", "run", "--data-dir", str(s.cp_dir), "--tick-seconds", str(self.tick_seconds),
            "--heartbeat-seconds", str(self.heartbeat_seconds), "--heartbeat-timeout", str(self.heartbeat_timeout))],
            self.logs / f"cp-{site}.log")
        s.cp.start()
        self.wait_for(lambda: self.health(site) is not None, timeout, f"control plane {s.cp_name} to answer",
                      log=s.cp)

    # ------------------------------------------------------------------ agents

    def active(self) -> str:
        """The site whose control plane is active now."""
        for k in ("a", "b"):
            h = self.health(k)
            if h and h.get("role") == "active":
                return k
        raise DeploymentError("no control plane is active")

    def add_agent(self, site: str, name: str, *, cloud: str, domains: Sequence[str], vm_prefix: str = "",
                  timeout: float = 90.0) -> SiteAgent:
        s, other = self.sites[site], self.sites["b" if site == "a" else "a"]
        act = self.sites[self.active()]
        data_dir = self.workdir / "agents" / name
        key = self.client(act.key).post("/registration-keys", json={"description": f"agent {name}", "valid_days": 1})
        key_file = self.workdir / f".{name}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key["key"])
        try:
            args = ["agent", "register", "--data-dir", str(data_dir), "--server", act.url,
                    "--standby-server", (other if act is s else s).url, "--ca", str(self.ca), "--key-file",
                    str(key_file), "--name", name, "--site", SITE_NAME[site], "--server-name", f"mgr-{site}",
                    "--cloud", cloud, "--host-group", f"{cloud}-hosts", "--host", name, "--listen",
                    f"{s.addr}:{AGENT_PORT}", "--libvirt-uri", self.libvirt_uri]
            for d in domains:
                args += ["--domains", d]
            if vm_prefix:
                args += ["--vm-prefix", vm_prefix]
            self.cli(site, *args)
        finally:
            key_file.unlink(missing_ok=True)
        agent = SiteAgent(name, site, data_dir, cloud, Process(
            f"agent-{name}", [*self.ns(site), *standby_command("agent", "run", "--data-dir", str(data_dir))],
            self.logs / f"agent-{name}.log"))
        s.agents[name] = agent
        self.start_agent(name, timeout=timeout)
        return agent

    def agent(self, name: str) -> SiteAgent:
        for s in self.sites.values():
            if name in s.agents:
                return s.agents[name]
        raise KeyError(name)

    def start_agent(self, name: str, timeout: float = 90.0) -> None:
        a = self.agent(name)
        a.process.start()

        def heard() -> bool:
            try:
                return bool(self.client(self.active()).get(f"/agents/{name}").get("heartbeat_ok"))
            except (StandbyError, DeploymentError):
                return False

        self.wait_for(heard, timeout, f"agent {name} to send a heartbeat", log=a.process)

        def listed() -> bool:  # its first inventory follows the first libvirt connection
            try:
                hosts = self.client(self.active()).get("/hosts", params={"cloud": a.cloud})["items"]
            except (StandbyError, DeploymentError):
                return False
            return any(h.get("name") == name for h in hosts)

        self.wait_for(listed, timeout, f"agent {name}'s inventory", log=a.process)

    # ------------------------------------------------------------------ the disaster and after

    def lose_site(self, site: str) -> list[int]:
        """Every process of the site SIGKILLed and its links cut, at once."""
        self.net.isolate(site)
        killed = self.net.kill_all(site)
        s = self.sites[site]
        for p in [s.cp, *(a.process for a in s.agents.values())]:
            if p is not None and p.popen is not None:
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    pass
                p.popen = None
        c = self._clients.pop(site, None)
        if c is not None:
            c.close()
        self.note(f"site {site} lost: {len(killed)} processes killed, links cut")
        return killed

    def promote(self, site: str) -> dict[str, Any]:
        """Declare the disaster: `standby server promote` on the site's control plane."""
        import json

        s = self.sites[site]
        self.note(f"disaster declared: promoting {s.cp_name}")
        p = self.cli(site, "server", "promote", "--data-dir", str(s.cp_dir), "--json")
        out = json.loads(p.stdout)
        self.note(f"{s.cp_name} active")
        return out

    def restore_site(self, site: str, *, agents: bool = True) -> None:
        """The lost site comes back: its links up, its database rebuilt as a standby of the
        active site's (the old one diverged), its control plane passive, its agents running."""
        from standby.testing.postgres import PgCluster

        s = self.sites[site]
        active = self.sites["b" if site == "a" else "a"]
        self.net.reconnect(site)
        old = s.pg
        s.pg = PgCluster(old.bindir, listen=s.addr, prefix=self.ns(site), replication=True, durable=True,
                         trust_net="10.213.0.0/24")
        s.pg.start_standby(active.addr, active.pg.port)
        old.stop()  # the diverged data directory of the lost site goes
        # the control plane's settings still name the database by its (old) socket directory
        self.cli(site, "server", "init", "--data-dir", str(s.cp_dir), "--listen", f"0.0.0.0:{PORT}", "--db",
                 self._db_url(site), "--name", s.cp_name, "--public-url", s.url, "--san", s.addr, "--san",
                 s.admin_addr, "--force")
        self._start_cp(site)
        self.note(f"site {site} back: database a standby of {active.cp_name}'s, {s.cp_name} passive")
        if agents:
            for name in s.agents:
                self.start_agent(name)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        for s in self.sites.values():
            for a in s.agents.values():
                a.process.stop()
            if s.cp is not None:
                s.cp.stop()
        for s in self.sites.values():
            if s.pg is not None:
                s.pg.stop()
        self.net.close()

    def __enter__(self) -> TwoSiteDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
