"""`standby agent`: the process on each hypervisor host.

    standby agent receive --listen 0.0.0.0:7443 --store DIR --cert C --key K --ca CA
        the replication receiver alone (no control plane): apply cycles to a replica store
    standby agent register --data-dir A --server https://cp:8443 --ca CA_CERT --key-file F \\
        --name N --site S --server-name M --cloud C [--host-group G] [--host H] \\
        --listen HOST:PORT [--libvirt-uri URI] [--domains GLOB ...] [--vm-prefix P]
        make a key and have the control plane certify it; writes A/agent.json
    standby agent run --data-dir A
        receiver + heartbeats + inventory + tasks, until SIGTERM/SIGINT
    standby agent failover VM --data-dir A [--point P] [--network NET]
        break glass: start VM's replica here from the replica store, when no control plane answers
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from standby.errors import BadInput

console = Console()

agent_app = typer.Typer(help="The agent on each hypervisor host: replication receiver and sender, and the "
                             "control plane's worker.", no_args_is_help=True)


def _logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: a heartbeat a few seconds and a claim a second
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass


@agent_app.command("receive")
def receive_cmd(
    listen: str = typer.Option("0.0.0.0:7443", "--listen", help="HOST:PORT to listen on (port 0: any)."),
    store: Path = typer.Option(..., "--store", help="Replica store directory."),
    cert: Path = typer.Option(..., "--cert", envvar="STANDBY_TLS_CERT", help="This host's certificate (PEM)."),
    key: Path = typer.Option(..., "--key", envvar="STANDBY_TLS_KEY", help="This host's private key (PEM)."),
    ca: Path = typer.Option(..., "--ca", envvar="STANDBY_TLS_CA", help="The CA certificate both ends trust (PEM)."),
) -> None:
    """Serve the replication receiver only: apply cycles from senders to the replica store."""
    from standby.replication.receiver import Receiver
    from standby.replication.sender import Endpoint
    from standby.replication.store import ReplicaStore
    from standby.replication.tls import Identity, server_context

    _logging()
    ep = Endpoint.parse(listen, allow_any_port=True)
    ctx = server_context(Identity(cert, key, ca))
    try:
        rx = Receiver(ReplicaStore(store), ctx, ep.host, ep.port)
    except OSError as exc:
        raise BadInput(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    rx.start()
    log = logging.getLogger("standby.agent")
    log.info("agent listening on %s:%d, store %s", rx.address[0], rx.address[1], store)
    _wait_for_signal()
    log.info("agent stopping")
    rx.stop()


@agent_app.command("register")
def register_cmd(
    data_dir: Path = typer.Option(..., "--data-dir", help="The agent's data directory (created)."),
    server: str = typer.Option(..., "--server", envvar="STANDBY_URL", help="Control plane URL, https://HOST:PORT."),
    standby_servers: list[str] = typer.Option(None, "--standby-server",
                                              help="The standby control plane of the other site (repeatable): "
                                                   "the agent follows whichever is active."),
    ca: Path = typer.Option(..., "--ca", envvar="STANDBY_CA",
                            help="The control plane's CA certificate (its DATA_DIR/ca/ca.crt)."),
    key: str = typer.Option(None, "--key", help="The registration key (better: --key-file or "
                                                "$STANDBY_REGISTRATION_KEY, which stay out of the process list)."),
    key_file: Path = typer.Option(None, "--key-file", help="A file holding the registration key."),
    name: str = typer.Option(..., "--name", help="This agent's name (its certificate CN)."),
    site: str = typer.Option(..., "--site", help="The site the host is in."),
    server_name: str = typer.Option(..., "--server-name", help="The site manager (server) owning the cloud."),
    cloud: str = typer.Option(..., "--cloud", help="The cloud the host serves."),
    host_group: str = typer.Option(None, "--host-group", help="The host group of the host in the cloud."),
    host: str = typer.Option(None, "--host", help="The host's name (default: this machine's host name)."),
    listen: str = typer.Option(..., "--listen", help="Replication address HOST:PORT: the receiver listens "
                                                     "there and peers dial it."),
    libvirt_uri: str = typer.Option("qemu:///system", "--libvirt-uri", help="The libvirt host this agent drives."),
    domains: list[str] = typer.Option(None, "--domains", help="Glob of the libvirt domains this agent owns "
                                                              "(repeatable; default: all of them)."),
    vm_prefix: str = typer.Option("", "--vm-prefix", help="Prefix of the replica VMs this agent defines "
                                                          "(<prefix><vm>; test failovers <prefix><vm>-test)."),
) -> None:
    """Register this agent: a key made here, a certificate from the control plane."""
    import os

    from standby.agent.config import AgentConfig
    from standby.agent.registration import read_key_file, register

    if key and key_file:
        raise BadInput("give the registration key once: --key or --key-file")
    secret = key or (read_key_file(key_file) if key_file else os.environ.get("STANDBY_REGISTRATION_KEY", ""))
    if not secret:
        raise BadInput("no registration key: --key-file F, --key KEY or $STANDBY_REGISTRATION_KEY")
    hostname = host or socket.gethostname().split(".")[0]
    cfg = AgentConfig(data_dir=data_dir, name=name, server_url=server, site=site, server=server_name, cloud=cloud,
                      host=hostname, listen=listen, host_group=host_group, libvirt_uri=libvirt_uri,
                      domains=list(domains or []), vm_prefix=vm_prefix, standby_urls=list(standby_servers or []))
    cfg = register(cfg, registration_key=secret, ca_file=ca)
    console.print(f"agent {escape(cfg.name)} registered (id {cfg.agent_id}) with {escape(cfg.server_url)}: "
                  f"host {escape(cfg.host)} in cloud {escape(cfg.cloud)}, replication on {escape(cfg.listen)}; "
                  f"start it with `standby agent run --data-dir {escape(str(cfg.data_dir))}`")


@agent_app.command("run")
def run_cmd(
    data_dir: Path = typer.Option(..., "--data-dir", help="The data directory `agent register` wrote."),
) -> None:
    """Run the agent: the replication receiver, heartbeats, inventory and tasks (until SIGTERM/SIGINT)."""
    from standby.agent.config import AgentConfig
    from standby.agent.runtime import AgentRuntime

    _logging()
    cfg = AgentConfig.load(data_dir)
    rt = AgentRuntime(cfg).start()
    try:
        _wait_for_signal()
    finally:
        rt.stop()


@agent_app.command("failover")
def failover_cmd(
    vm: str = typer.Argument(..., help="The VM to start here (as the primary named it)."),
    data_dir: Path = typer.Option(..., "--data-dir", help="This secondary agent's data directory."),
    point: str = typer.Option("latest", "--point", help="latest, latest_app_consistent or a point id "
                                                        "(standby points show --vm lists them)."),
    network: str = typer.Option(None, "--network", help="Connect every NIC to this network instead of the "
                                                       "mapping the point carries."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON."),
) -> None:
    """Break glass: start a VM's replica on this host from the replica store alone, when no
    control plane answers (refused while one does). Reported to the control plane when it
    is back."""
    from standby.agent import breakglass
    from standby.agent.config import AgentConfig

    cfg = AgentConfig.load(data_dir)
    say = (lambda line: None) if as_json else (lambda line: console.print(escape(line)))
    rec = breakglass.failover(cfg, vm, point=point, network=network, report=say)
    if as_json:
        print(json.dumps({**rec.as_dict(), "seconds": rec.seconds}, indent=2))
        return
    console.print(f"[green]{escape(vm)} runs here as {escape(rec.replica_vm)}[/] from point {rec.point['id']} "
                  f"in {rec.seconds or 0:.1f} s; recorded in {escape(str(breakglass.records_dir(cfg)))} and "
                  "reported to the control plane when one answers again")


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
