"""`standby agent register`: make this agent known to the control plane.

The agent makes its private key and a certificate request here (`tls.make_key_and_csr`);
only the request travels, with the registration key, to `POST /agents/register`. The
answer is the certificate the control plane's CA signed and that CA's certificate. Files
written in the data dir: `agent.key` (0600, never leaves the host), `agent.crt`,
`ca.crt`, `agent.json` (the configuration, no secret). The registration key is used for
this one request and is never written to disk or to a log.

Registering again (a new key, a moved agent) replaces the key and certificate: the
control plane then recognises this agent by the new certificate only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from standby import __version__
from standby.replication import tls
from standby.agent.config import AgentConfig
from standby.errors import BadInput, RemoteError




def read_key_file(path: Path | str) -> str:
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BadInput(f"registration key file {path}: {exc.strerror or exc}") from None
    if not key:
        raise BadInput(f"registration key file {path} is empty")
    return key


def register(cfg: AgentConfig, *, registration_key: str, ca_file: Path | str,
             client_factory: Callable[..., Any] | None = None) -> AgentConfig:
    """Register `cfg` (its data dir, name, location, listen address, libvirt URI and
    domain filter) with the control plane at `cfg.server_url`, whose HTTPS certificate
    `ca_file` verifies. Returns the saved configuration."""
    from cryptography.hazmat.primitives import serialization

    from standby.client import ApiClient
    from standby.replication.tls import load_cert, make_key_and_csr

    if not registration_key:
        raise BadInput("no registration key given (--key or --key-file)")
    ca_file = Path(ca_file)
    if not ca_file.is_file():
        raise BadInput(f"CA certificate {ca_file} not found: use the control plane's ca.crt (DATA_DIR/ca/ca.crt)")
    key_pem, csr_pem = make_key_and_csr(cfg.name)
    body = {"key": registration_key, "name": cfg.name, "kind": "agent", "host": cfg.host, "site": cfg.site,
            "server": cfg.server, "cloud": cfg.cloud, "host_group": cfg.host_group, "address": cfg.listen,
            "csr_pem": csr_pem.decode(), "version": __version__}
    factory = client_factory or ApiClient
    client = factory(cfg.server_url, ca=str(ca_file), timeout=30.0)
    try:
        answer = client.post("/agents/register", json=body)
    finally:
        client.close()
    if not isinstance(answer, dict) or not all(isinstance(answer.get(k), str) for k in ("cert_pem", "ca_pem")):
        raise RemoteError(f"the control plane at {cfg.server_url} answered the registration without a certificate")
    cert = load_cert(answer["cert_pem"])
    load_cert(answer["ca_pem"])
    # The certificate must be for the key made here (a confused or hostile answer otherwise).
    ours = serialization.load_pem_private_key(key_pem, password=None).public_key()
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != ours.public_bytes(*fmt):
        raise RemoteError("the certificate the control plane returned is not for this agent's key")

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.data_dir, 0o700)
    tls.write_atomic(cfg.key_path, key_pem, 0o600)
    tls.write_atomic(cfg.cert_path, answer["cert_pem"].encode(), 0o644)
    tls.write_atomic(cfg.ca_path, answer["ca_pem"].encode(), 0o644)
    if isinstance(answer.get("agent_id"), int):
        cfg.agent_id = answer["agent_id"]
    hb = answer.get("heartbeat_seconds")
    if isinstance(hb, (int, float)) and not isinstance(hb, bool) and hb > 0:
        cfg.heartbeat_seconds = float(hb)
    cfg.save()
    return cfg
