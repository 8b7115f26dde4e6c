"""Opening libvirt connections and translating libvirt's errors at the boundary."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import libvirt

from standby.errors import BadInput, Conflict, NotFound, RemoteError, StandbyError

T = TypeVar("T")

# Silence libvirt's default handler, which prints every error to stderr: we raise ours.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT, libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
}
_CONFLICT = {libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED}
_BAD_INPUT = {libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_XML_DETAIL}


def translate(exc: libvirt.libvirtError, what: str) -> StandbyError:
    """A Standby error for a libvirt error, naming what we were doing."""
    code = exc.get_error_code()
    message = f"{what}: {exc.get_error_message() or exc}"
    if code in _NOT_FOUND:
        return NotFound(message)
    if code in _BAD_INPUT:
        return BadInput(message)
    if code in _CONFLICT:
        return Conflict(message)
    return RemoteError(message)


def call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Run a libvirt call; a libvirt error becomes a Standby error naming `what`."""
    try:
        return fn(*args)
    except libvirt.libvirtError as exc:
        raise translate(exc, what) from None


def open_connection(uri: str) -> libvirt.virConnect:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise RemoteError(f"cannot connect to {uri}: {exc.get_error_message() or exc}") from None
    if conn is None:
        raise RemoteError(f"cannot connect to {uri}")
    return conn


@contextmanager
def connected(uri: str) -> Iterator[libvirt.virConnect]:
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
