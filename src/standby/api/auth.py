"""Who is calling: operators by bearer token, agents by TLS client certificate.

- Operator API: `Authorization: Bearer <token>` (`store.repo.tokens`). A missing,
  unknown, revoked or expired token is a 401 with `WWW-Authenticate: Bearer`; a viewer
  may read (GET, HEAD), only an operator may change anything (otherwise 403).
- Agent API: the certificate the agent presented in the TLS handshake, as
  `scope["extensions"]["tls"]["client_cert_der"]` (put there by `api/server.py`'s
  protocol). Its SHA-256 fingerprint must belong to an active agent; otherwise 401.
  The handshake already refused certificates of other CAs (CERT_OPTIONAL against the
  control plane's CA), so a certificate here is one the control plane issued.

Neither a token nor a key is ever logged: messages name a token by its prefix at most.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from standby.api.errors import Forbidden, Unauthorized
from standby.store.base import utcnow
from standby.store.models import ApiToken
from standby.store.repo import agents as agents_repo
from standby.store.repo import tokens as tokens_repo
from standby.store.repo._common import hash_secret

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
AGENT_REMEMBERED_S = 10.0

# auto_error=False: a missing header is answered by `authenticate` in the contract's body;
# the scheme still documents bearer auth in the OpenAPI description.
bearer_scheme = HTTPBearer(auto_error=False, description="an API token (POST /api/v1/tokens)")


@dataclass(frozen=True)
class Principal:
    """An authenticated operator or viewer (plain data: no ORM row outlives its session)."""

    name: str
    role: str

    @property
    def may_change(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True)
class AgentIdentity:
    """The agent a client certificate belongs to."""

    id: int
    name: str
    host_name: str
    fingerprint: str


def authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("this request needs an API token: Authorization: Bearer <token>")
    store = request.app.state.services.store
    secret = credentials.credentials
    now = utcnow()
    # A read session first: a write transaction per request would serialize every API
    # call on SQLite's write lock, and a read transaction must not write (on SQLite in WAL
    # mode a read snapshot cannot be upgraded once another writer committed). Only when
    # last_used_at is due (once a minute per token) does `tokens.authenticate`, the
    # authority, run in a write transaction.
    with store.read() as s:
        token = s.scalars(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret))).one_or_none()
        valid = (
            token is not None
            and token.revoked_at is None
            and (token.expires_at is None or now < token.expires_at)
        )
        principal = Principal(token.name, token.role) if valid and token is not None else None
        touch = valid and token is not None and (
            token.last_used_at is None or now - token.last_used_at >= tokens_repo.TOUCH_INTERVAL
        )
    if touch:
        with store.transaction() as s:
            token = tokens_repo.authenticate(s, secret, now=now)
            principal = None if token is None else Principal(token.name, token.role)
    if principal is None:
        raise Unauthorized("the API token is unknown, revoked or expired")
    return principal


def require_viewer(principal: Principal = Depends(authenticate)) -> Principal:
    """Any valid token: viewers and operators may read."""
    return principal


def require_operator(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.may_change:
        raise Forbidden(f"token {principal.name!r} is a viewer's: only an operator's token may change anything")
    return principal


def authorize(request: Request, principal: Principal = Depends(authenticate)) -> Principal:
    """The operator routers' guard: reads need a viewer, every other method an operator.
    One guard on the router, so no route can forget its role check."""
    if request.method in SAFE_METHODS:
        return require_viewer(principal)
    return require_operator(principal)


def client_cert_der(request: Request) -> bytes | None:
    tls = request.scope.get("extensions", {}).get("tls") or {}
    der = tls.get("client_cert_der")
    return der if isinstance(der, (bytes, bytearray)) and der else None


def cert_fingerprint(der: bytes) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (as `replication.tls.fingerprint`)."""
    return hashlib.sha256(der).hexdigest()


def require_agent(request: Request) -> AgentIdentity:
    """The agent whose certificate made this request. A certificate found active is
    remembered for AGENT_REMEMBERED_S: every agent route checks its agent again in its own
    transaction (`_agent_row`, under the row lock), so a revocation holds at once there;
    this check only turns strangers away before anything else is done."""
    der = client_cert_der(request)
    if der is None:
        raise Unauthorized("the agent API needs the client certificate the control plane issued at registration")
    fp = cert_fingerprint(bytes(der))
    known: dict[str, tuple[AgentIdentity, float]] | None = getattr(request.app.state, "agent_idents", None)
    if known is None:
        known = request.app.state.agent_idents = {}
    hit = known.get(fp)
    if hit is not None and time.monotonic() < hit[1]:
        return hit[0]
    with request.app.state.services.store.read() as s:
        agent = agents_repo.agent_by_fingerprint(s, fp)
        ident = None if agent is None else AgentIdentity(agent.id, agent.name, agent.host_name, fp)
    if ident is not None:
        known[fp] = (ident, time.monotonic() + AGENT_REMEMBERED_S)
    if ident is None:
        raise Unauthorized(
            f"no active agent holds the certificate {fp[:16]}...: it was revoked or replaced; register the agent again"
        )
    return ident
