"""The reference's "single management server with two clouds" deployment, on this machine.

One control plane (`standby server run`) and two agents (`standby agent run`), each a
real subprocess with its own data dir and log under `workdir`, talking HTTPS with
certificates from the control plane's CA. The primary agent owns the libvirt domains
matching its `domains` globs; the secondary agent's replica store receives their disks.

    with LocalDeployment(Path("/tmp/sb")) as d:
        d.init()
        d.start_server()
        d.add_agent("host-a", cloud="primary", domains=["demo-*"])
        d.add_agent("host-b", cloud="secondary", domains=["dr-*"])
        api = d.client()

Used by `standby demo` and by the integration tests: both drive the deployment only
through the CLI processes and the REST API, as an operator would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from standby.client import ApiClient
from standby.errors import StandbyError

T = TypeVar("T")

SITE = "local"
SERVER = "mgr"


class DeploymentError(StandbyError):
    """A process of the local deployment did not start or answer in time."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick; a race is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def standby_command(*args: str) -> list[str]:
    """`standby ARGS` run with this interpreter (no dependence on PATH)."""
    return [sys.executable, "-c", "import sys; from standby.cli.main import run; sys.exit(run())", *args]


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        try:
            # Own process group: a kill takes the whole process, as a crash would.
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        finally:
            out.close()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, *, kill: bool = False, timeout: float = 20.0) -> int | None:
        """SIGTERM (or SIGKILL with `kill`), then wait; returns the exit status."""
        p = self.popen
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.popen = None
        return p.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class AgentHandle:
    name: str
    data_dir: Path
    cloud: str
    host: str
    listen: str
    process: Process


@dataclass
class LocalDeployment:
    workdir: Path
    db_url: str | None = None
    tick_seconds: float = 1.0
    heartbeat_timeout: float = 30.0
    libvirt_uri: str = "qemu:///system"
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    agents: dict[str, AgentHandle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.port = self.port or free_port()
        self.server_dir = self.workdir / "control-plane"
        self.logs = self.workdir / "logs"
        self.server = Process("server", standby_command(
            "server", "run", "--data-dir", str(self.server_dir),
            "--tick-seconds", str(self.tick_seconds), "--heartbeat-timeout", str(self.heartbeat_timeout)),
            self.logs / "server.log")
        self._client: ApiClient | None = None

    # -------------------------------------------------------------- control plane

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.server_dir / "ca" / "ca.crt"

    @property
    def token_file(self) -> Path:
        return self.server_dir / "admin.token"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def run_cli(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run `standby ARGS` as an operator would, pointed at this control plane."""
        env = self._env()
        env.update(STANDBY_URL=self.url, STANDBY_CA=str(self.ca), STANDBY_TOKEN_FILE=str(self.token_file))
        env.pop("STANDBY_TOKEN", None)
        p = subprocess.run(standby_command(*args), capture_output=True, text=True, env=env, timeout=timeout)
        if check and p.returncode != 0:
            raise DeploymentError(f"standby {' '.join(args)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def init(self) -> None:
        args = ["server", "init", "--data-dir", str(self.server_dir), "--listen", f"127.0.0.1:{self.port}"]
        if self.db_url:
            args += ["--db", self.db_url]
        self.run_cli(*args)

    def start_server(self, timeout: float = 60.0) -> None:
        self.server.start(self._env())
        self.wait_for(self._server_answers, timeout, "the control plane to answer",
                      alive=lambda: self.server.running, log=self.server)

    def stop_server(self, *, kill: bool = False) -> int | None:
        # The API client stays: it reconnects to a restarted control plane.
        return self.server.stop(kill=kill)

    def _server_answers(self) -> bool:
        try:
            self.client().get("/health")
            return True
        except StandbyError:
            return False

    def client(self) -> ApiClient:
        """An operator's API client (the admin token)."""
        if self._client is None:
            self._client = ApiClient(self.url, token=self.token_file.read_text().strip(), ca=str(self.ca), timeout=30)
        return self._client

    # -------------------------------------------------------------- agents

    def add_agent(self, name: str, *, cloud: str, domains: Sequence[str], host: str | None = None,
                  vm_prefix: str = "", host_group: str | None = None, start: bool = True,
                  timeout: float = 60.0) -> AgentHandle:
        """Register an agent with a fresh registration key and (by default) start it. Its
        host joins the host group `<cloud>-hosts` unless another is named."""
        data_dir = self.workdir / "agents" / name
        listen = f"127.0.0.1:{free_port()}"
        key = self.client().post("/registration-keys", json={"description": f"demo agent {name}", "valid_days": 1})
        key_file = self.workdir / f".{name}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key["key"])
        try:
            args = ["agent", "register", "--data-dir", str(data_dir), "--server", self.url, "--ca", str(self.ca),
                    "--key-file", str(key_file), "--name", name, "--site", SITE, "--server-name", SERVER,
                    "--cloud", cloud, "--host-group", host_group or f"{cloud}-hosts", "--host", host or name, "--listen", listen, "--libvirt-uri", self.libvirt_uri]
            for d in domains:
                args += ["--domains", d]
            if vm_prefix:
                args += ["--vm-prefix", vm_prefix]
            self.run_cli(*args)
        finally:
            key_file.unlink(missing_ok=True)
        proc = Process(f"agent-{name}", standby_command("agent", "run", "--data-dir", str(data_dir)),
                       self.logs / f"agent-{name}.log")
        handle = AgentHandle(name, data_dir, cloud, host or name, listen, proc)
        self.agents[name] = handle
        if start:
            self.start_agent(name, timeout=timeout)
        return handle

    def start_agent(self, name: str, timeout: float = 60.0) -> None:
        a = self.agents[name]
        a.process.start(self._env())
        self.wait_for(lambda: self._agent_heartbeat_ok(name), timeout, f"agent {name} to send a heartbeat",
                      alive=lambda: a.process.running, log=a.process)
        # Its first inventory follows the first libvirt connection (seconds, the first time).
        self.wait_for(lambda: self._host_listed(a.host, a.cloud), timeout, f"agent {name}'s inventory",
                      alive=lambda: a.process.running, log=a.process)

    def stop_agent(self, name: str, *, kill: bool = False) -> int | None:
        return self.agents[name].process.stop(kill=kill)

    def _host_listed(self, host: str, cloud: str) -> bool:
        try:
            hosts = self.client().get("/hosts", params={"cloud": cloud})["items"]
        except StandbyError:
            return False
        return any(h.get("name") == host for h in hosts)

    def _agent_heartbeat_ok(self, name: str) -> bool:
        try:
            agent = self.client().get(f"/agents/{name}")
        except StandbyError:
            return False
        return bool(agent.get("heartbeat_ok"))

    # -------------------------------------------------------------- waiting

    def wait_for(self, pred: Callable[[], T], timeout: float, what: str, *, interval: float = 0.5,
                 alive: Callable[[], bool] | None = None, log: Process | None = None) -> T:
        """Poll `pred` until it is truthy; a clear error (with the process log's tail) if not."""
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            if alive is not None and not alive():
                raise DeploymentError(f"gave up waiting for {what}: the process exited\n{log.tail() if log else ''}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}\n{log.tail() if log else ''}")
            time.sleep(interval)

    def item(self, vm: str) -> dict[str, Any]:
        return self.client().get(f"/items/{vm}")

    def wait_job(self, job_id: int, timeout: float = 600.0) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            job = self.client().get(f"/jobs/{job_id}")
            return job if job["state"] in ("succeeded", "failed", "errored", "cancelled") else None

        return self.wait_for(ended, timeout, f"job {job_id} to end", log=self.server)

    # -------------------------------------------------------------- teardown

    def close(self) -> None:
        for a in self.agents.values():
            a.process.stop()
        self.stop_server()
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
