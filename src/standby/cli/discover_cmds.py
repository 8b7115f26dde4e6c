"""`standby discover`: libvirt hosts as a fabric file that `standby check` reads."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from standby.errors import BadInput

err_console = Console(stderr=True)


class _FabricDumper(yaml.SafeDumper):
    """Block style for mappings, flow style for lists of plain values (CPU features)."""


def _list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(x, (str, int, float, bool)) or x is None for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FabricDumper.add_representer(list, _list)


def to_yaml(doc: dict[str, Any], header: list[str]) -> str:
    body = yaml.dump(doc, Dumper=_FabricDumper, sort_keys=False, default_flow_style=False, width=100,
                     allow_unicode=True)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + "\n" + body


def _header(uris: list[str], warnings: list[str]) -> list[str]:
    lines = [f"Fabric discovered by `standby discover` from {', '.join(uris)}.",
             "Not measured, so left at their defaults: reaches_control_plane, reaches_hosts,",
             "replication_address and clock_skew_seconds of each host; add pairings and",
             "network_mappings, then run `standby check` on this file."]
    if warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in warnings]
    return lines


def _write(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a fabric file."""
    path = path.expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"--out: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def discover_cmd(
    uris: list[str] = typer.Argument(..., metavar="URI...", help="libvirt URIs, e.g. qemu:///system qemu+ssh://kvm2/system."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the fabric here (default: print it)."),
    site: list[str] = typer.Option(None, "--site", help="Site name: once for all hosts, or once per URI."),
    server: list[str] = typer.Option(None, "--server", help="Management server name: once, or once per URI."),
    cloud: list[str] = typer.Option(None, "--cloud", help="Cloud name: once, or once per URI."),
    control_plane: str = typer.Option(None, "--control-plane", help="Control plane endpoint (https://HOST:PORT)."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of YAML (still a valid fabric file)."),
) -> None:
    """Discover libvirt hosts (versions, CPU, storage, VMs, disks, NICs) into a fabric file."""
    from standby.drivers.libvirt.discovery import discover_fabric

    warnings: list[str] = []
    doc = discover_fabric(list(uris), sites=site or None, servers=server or None, clouds=cloud or None,
                          control_plane=control_plane, warnings=warnings)
    text = json.dumps(doc, indent=2) + "\n" if as_json else to_yaml(doc, _header(list(uris), warnings))
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if out is None:
        sys.stdout.write(text)
        return
    _write(out, text)
    hosts = doc["hosts"]
    vms = sum(len(h.get("vms", {})) for h in hosts.values())
    err_console.print(f"wrote {out}: {len(hosts)} host(s), {vms} VM(s); next: standby check {escape(str(out))}",
                      highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("discover")(discover_cmd)
