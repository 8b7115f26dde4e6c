"""Bad fabric files: every fault is a FabricError naming the file, the field and (when
the loader can know it) the line, and `standby check` turns it into exit code 2 with
that message on stderr. Never a traceback, never a hang."""

from __future__ import annotations

import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from standby.cli.main import run
from standby.domain.fabric import Fabric
from standby.errors import FabricError
from standby.fabric_file import MAX_FABRIC_BYTES, load_fabric, parse_fabric

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# A valid fabric in block style, one setting per line, so each case below can break one
# line and know which line the error must report.
BASE = textwrap.dedent("""\
    sites:
      east: {}
      west: {}
    servers:
      mgr-east:
        site: east
        platform: kvm
        version: "0.1.0"
      mgr-west:
        site: west
        platform: kvm
        version: "0.1.0"
    clouds:
      gold-east:
        server: mgr-east
        capabilities: [kvm]
        host_groups: [rack-e]
      gold-west:
        server: mgr-west
        capabilities: [kvm]
        host_groups: [rack-w]
    host_groups:
      rack-e:
        hosts: [kvm-e1]
      rack-w:
        hosts: [kvm-w1]
    clusters:
      c1: {}
    networks:
      net-e:
        site: east
      net-w:
        site: west
    hosts:
      kvm-e1:
        cluster: c1
        replication_address: 10.1.0.11
        reaches_hosts: [kvm-w1]
        vms:
          web01:
            disks:
              vda:
                format: qcow2
                size_gib: 20
            nics:
              - network: net-e
      kvm-w1:
        replication_address: 10.2.0.11
    pairings:
      - primary: gold-east
        secondary: gold-west
    network_mappings:
      - primary: net-e
        secondary: net-w
    """)


def line_of(text: str, needle: str) -> int:
    """1-based line of the one line containing needle."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}"
    return hits[0]


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def expect_bad(path: Path, capsys: pytest.CaptureFixture[str], *fragments: str, line: int | None = None) -> FabricError:
    """The loader raises a FabricError naming the file, each fragment (the field, the
    fault) and the line; `standby check` exits 2 with the same on stderr."""
    with pytest.raises(FabricError) as info:
        load_fabric(path)
    err = info.value
    assert err.path == str(path)
    assert err.problems and all(p.strip() for p in err.problems)
    assert err.message.startswith(f"{path}: ")
    assert err.exit_code == 2
    for fragment in fragments:
        assert fragment in err.message
    if line is not None:
        assert re.search(rf"\bline {line}\b", err.message), err.message

    capsys.readouterr()
    rc = run(["check", str(path)])
    out, stderr = capsys.readouterr()
    stderr = ANSI.sub("", stderr)
    assert rc == 2, (out, stderr)
    assert "Traceback" not in stderr + out
    assert "internal error" not in stderr
    assert str(path) in stderr  # whole, not hard-wrapped
    for fragment in fragments:
        assert fragment in stderr
    if line is not None:
        assert f"line {line}" in stderr
    return err


def write(tmp_path: Path, text: str, name: str = "fabric.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_base_fabric_is_valid(tmp_path: Path) -> None:
    fabric = load_fabric(write(tmp_path, BASE))
    assert isinstance(fabric, Fabric)
    assert set(fabric.hosts) == {"kvm-e1", "kvm-w1"}


# --- wrong types -----------------------------------------------------------------------

WRONG_TYPES = [
    pytest.param("size_gib: 20", "size_gib: big", "hosts.kvm-e1.vms.web01.disks.vda.size_gib", "number",
                 id="size_gib-string"),
    pytest.param("size_gib: 20", "size_gib: -5", "hosts.kvm-e1.vms.web01.disks.vda.size_gib", "greater than 0",
                 id="size_gib-negative"),
    pytest.param("  c1: {}", "  c1: [a, b]", "clusters.c1", "dictionary", id="list-for-mapping"),
    pytest.param("    hosts: [kvm-e1]", "    hosts: kvm-e1", "host_groups.rack-e.hosts", "list",
                 id="scalar-for-list"),
    pytest.param("    platform: kvm\n    version: \"0.1.0\"\n  mgr-west",
                 "    platform: kvm\n    version: 0.1\n  mgr-west", "servers.mgr-east.version", "string",
                 id="version-float"),
    pytest.param("    replication_address: 10.2.0.11", "    replication_address: 10.2.0.11\n    reaches_control_plane: maybe",
                 "hosts.kvm-w1.reaches_control_plane", "boolean", id="bool-as-word"),
    pytest.param("    capabilities: [kvm]\n    host_groups: [rack-e]",
                 "    capabilities: [vmware]\n    host_groups: [rack-e]",
                 "clouds.gold-east.capabilities.0", "'hyperv' or 'kvm'", id="bad-capability"),
    pytest.param("format: qcow2", "format: vmdk", "hosts.kvm-e1.vms.web01.disks.vda.format",
                 "qcow2", id="bad-disk-format"),
]


@pytest.mark.parametrize(("old", "new", "field", "fault"), WRONG_TYPES)
def test_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, field: str,
                    fault: str) -> None:
    text = edit(old, new)
    bad_line = next(i for i, line in enumerate(text.splitlines(), 1) if line not in BASE.splitlines())
    expect_bad(write(tmp_path, text), capsys, field, fault, line=bad_line)


def test_a_list_where_the_top_level_section_mapping_is_expected(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("sites:\n  east: {}\n  west: {}\n", "sites:\n  - east\n  - west\n")
    expect_bad(write(tmp_path, text), capsys, "sites", "dictionary", line=1)


# --- unknown keys ----------------------------------------------------------------------

def test_unknown_top_level_key_on_line_7(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = textwrap.dedent("""\
        # A fabric with a typo.
        sites:
          east: {}
        servers:
          mgr: {site: east, platform: kvm, version: "0.1.0"}

        hostgroups:
          g1: {hosts: []}
        """)
    err = expect_bad(write(tmp_path, text), capsys, "hostgroups", "unknown key", line=7)
    assert err.problems == ["line 7: hostgroups: unknown key (check its spelling and the README's fabric reference)"]


def test_nested_typo_names_the_misspelt_key_and_the_missing_one(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    platform: kvm\n    version: \"0.1.0\"\n  mgr-west", "    platfrom: kvm\n    version: \"0.1.0\"\n  mgr-west")
    err = expect_bad(write(tmp_path, text), capsys, "servers.mgr-east.platfrom", "unknown key",
                     "servers.mgr-east.platform", "required field is missing", line=7)
    assert len(err.problems) == 2


def test_deeply_nested_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("size_gib: 20", "size_gb: 20")
    expect_bad(write(tmp_path, text), capsys, "hosts.kvm-e1.vms.web01.disks.vda.size_gb", "unknown key",
               line=line_of(text, "size_gb"))


# --- missing required fields -----------------------------------------------------------

def test_server_without_platform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    site: west\n    platform: kvm\n", "    site: west\n")
    # Located at the server that lacks it (the field has no line of its own).
    expect_bad(write(tmp_path, text), capsys, "servers.mgr-west.platform", "required field is missing",
               line=line_of(text, "mgr-west:"))


def test_cloud_without_server_and_pairing_without_secondary(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    server: mgr-west\n", "")
    text = edit("    secondary: gold-west\n", "", text)
    err = expect_bad(write(tmp_path, text), capsys, "clouds.gold-west.server", "pairings.0.secondary",
                     "required field is missing")
    assert len(err.problems) == 2


# --- broken YAML -----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "line"), [
    pytest.param("sites:\n  east: {}\nclouds: {a: [1, 2\nhosts: {}\n", 4, id="unclosed-bracket"),
    pytest.param("sites:\n  east: {}\n west: {}\n", 3, id="bad-indentation"),
    pytest.param("sites:\n  east: {}\n\twest: {}\n", 3, id="tab"),
    pytest.param("sites:\n  east: {description: \"unterminated\n", 3, id="unclosed-quote"),
    pytest.param("sites: {}\n---\nservers: {}\n", 2, id="two-documents"),
    pytest.param("sites: *nowhere\n", 1, id="undefined-alias"),
    pytest.param("sites: !!python/object/apply:os.system [echo hi]\n", 1, id="python-tag-is-refused"),
    pytest.param("sites: !custom {}\n", 1, id="unknown-tag"),
    pytest.param("sites: {? [a, b] : {}}\n", 1, id="unhashable-key"),
])
def test_broken_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int) -> None:
    expect_bad(write(tmp_path, text), capsys, "not valid YAML", line=line)


@pytest.mark.parametrize(("value", "why"), [
    pytest.param("9" * 5000, "4300 digits", id="integer-too-long"),
    pytest.param("2020-13-45", "month", id="impossible-date"),
    pytest.param("2001-12-14t21:59:43.10-99:99", "offset", id="impossible-timestamp"),
])
def test_a_value_python_cannot_build_is_a_yaml_error_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   value: str, why: str) -> None:
    text = edit("  port: 7443", f"  port: {value}", BASE + "replication:\n  port: 7443\n")
    err = expect_bad(write(tmp_path, text), capsys, "not valid YAML", "cannot read the value", why,
                     line=line_of(text, "port:"))
    assert len(err.message) < 600  # the value is clipped, not echoed whole


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b"])
def test_a_control_character_is_refused_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      char: str) -> None:
    text = edit("  west: {}", f"  west: {{description: \"a{char}b\"}}")
    expect_bad(write(tmp_path, text), capsys, "not valid YAML", f"U+{ord(char):04X}", line=3)


# --- references to undefined names ----------------------------------------------------

UNDEFINED = [
    pytest.param("    site: west\n    platform", "    site: north\n    platform", "servers.mgr-west.site", "'north'",
                 "sites", id="server-site"),
    pytest.param("    server: mgr-east", "    server: mgr-nowhere", "clouds.gold-east.server", "'mgr-nowhere'",
                 "servers", id="cloud-server"),
    pytest.param("host_groups: [rack-w]", "host_groups: [rack-x]", "clouds.gold-west.host_groups.0", "'rack-x'",
                 "host_groups", id="cloud-host-group"),
    pytest.param("    hosts: [kvm-w1]", "    hosts: [kvm-w9]", "host_groups.rack-w.hosts.0", "'kvm-w9'", "hosts",
                 id="group-host"),
    pytest.param("    cluster: c1", "    cluster: c2", "hosts.kvm-e1.cluster", "'c2'", "clusters", id="host-cluster"),
    pytest.param("reaches_hosts: [kvm-w1]", "reaches_hosts: [kvm-w2]", "hosts.kvm-e1.reaches_hosts.0", "'kvm-w2'",
                 "hosts", id="host-reaches"),
    pytest.param("- network: net-e", "- network: net-x", "hosts.kvm-e1.vms.web01.nics.0.network", "'net-x'",
                 "networks", id="nic-network"),
    pytest.param("    site: east\n  net-w", "    site: south\n  net-w", "networks.net-e.site", "'south'", "sites",
                 id="network-site"),
    pytest.param("  - primary: gold-east", "  - primary: gold-north", "pairings.0.primary", "'gold-north'", "clouds",
                 id="pairing-primary"),
    pytest.param("    secondary: gold-west", "    secondary: gold-south", "pairings.0.secondary", "'gold-south'",
                 "clouds", id="pairing-secondary"),
    pytest.param("  - primary: net-e", "  - primary: net-q", "network_mappings.0.primary", "'net-q'", "networks",
                 id="mapping-primary"),
    pytest.param("    secondary: net-w", "    secondary: net-z", "network_mappings.0.secondary", "'net-z'", "networks",
                 id="mapping-secondary"),
]


@pytest.mark.parametrize(("old", "new", "field", "name", "section"), UNDEFINED)
def test_reference_to_an_undefined_name(tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str,
                                        field: str, name: str, section: str) -> None:
    text = edit(old, new)
    needle = new.split("\n")[0].strip()
    err = expect_bad(write(tmp_path, text), capsys, field, f"{name} is not defined under {section}",
                     line=line_of(text, needle))
    assert len(err.problems) == 1


def test_every_undefined_reference_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    server: mgr-east", "    server: mgr-nowhere")
    text = edit("    cluster: c1", "    cluster: c2", text)
    text = edit("  - primary: net-e", "  - primary: net-q", text)
    err = expect_bad(write(tmp_path, text), capsys, "clouds.gold-east.server", "hosts.kvm-e1.cluster",
                     "network_mappings.0.primary")
    assert len(err.problems) == 3


def test_a_cloud_paired_with_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    secondary: gold-west", "    secondary: gold-east")
    expect_bad(write(tmp_path, text), capsys, "pairings.0", "'gold-east' cannot be paired with itself",
               line=line_of(text, "- primary: gold-east"))


# --- duplicates ------------------------------------------------------------------------

def test_duplicate_top_level_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BASE + "sites:\n  north: {}\n"
    last = len(text.splitlines()) - 1
    err = expect_bad(write(tmp_path, text), capsys, "sites", "duplicate key (first defined on line 1)", line=last)
    assert err.problems == [f"line {last}: sites: duplicate key (first defined on line 1)"]


def test_duplicate_name_inside_a_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("  west: {}\n", "  west: {}\n  east: {description: again}\n")
    expect_bad(write(tmp_path, text), capsys, "sites.east", "duplicate key (first defined on line 2)", line=4)


def test_duplicate_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    platform: kvm\n    version: \"0.1.0\"\n  mgr-west",
                "    platform: kvm\n    version: \"0.1.0\"\n    platform: hyperv\n  mgr-west")
    expect_bad(write(tmp_path, text), capsys, "servers.mgr-east.platform", "first defined on line 7", line=9)


# --- files that are not a fabric at all -------------------------------------------------

@pytest.mark.parametrize("text", [
    pytest.param("", id="empty"),
    pytest.param("# only a comment\n", id="only-a-comment"),
    pytest.param("\n\n   \n", id="only-blank-lines"),
    pytest.param("~\n", id="null"),
    pytest.param("---\n...\n", id="empty-document"),
])
def test_a_file_without_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    expect_bad(write(tmp_path, text), capsys, "holds no settings")


@pytest.mark.parametrize(("text", "kind"), [
    pytest.param("- sites\n- servers\n", "list", id="list"),
    pytest.param("just words\n", "str", id="string"),
    pytest.param("42\n", "int", id="number"),
    pytest.param("true\n", "bool", id="bool"),
])
def test_a_top_level_that_is_not_a_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                           kind: str) -> None:
    expect_bad(write(tmp_path, text), capsys, "top level must be a mapping", f"not a {kind}", line=1)


def test_a_top_level_key_that_is_not_a_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_bad(write(tmp_path, "sites: {}\n1: {}\n"), capsys, "Keys should be strings")


def test_a_50_mb_file_is_refused_before_it_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge.yaml"
    chunk = ("# " + "x" * 1021 + "\n").encode()
    with path.open("wb") as f:
        for _ in range(50 * 1024):
            f.write(chunk)
    assert path.stat().st_size == 50 * 2**20
    started = time.monotonic()
    expect_bad(path, capsys, "50.0 MiB", f"at most {MAX_FABRIC_BYTES // 2**20} MiB")
    assert time.monotonic() - started < 5


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_device_is_refused_not_read_forever(capsys: pytest.CaptureFixture[str]) -> None:
    # stat() says 0 bytes; the loader must stop reading at its limit.
    started = time.monotonic()
    expect_bad(Path("/dev/zero"), capsys, f"at most {MAX_FABRIC_BYTES // 2**20} MiB")
    assert time.monotonic() - started < 10


def test_non_utf8_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"sites:\n  east: {}\n  west: {description: caf\xe9}\n")
    expect_bad(path, capsys, "not UTF-8", line=3)


def test_utf16_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "utf16.yaml"
    path.write_bytes(BASE.encode("utf-16"))
    expect_bad(path, capsys, "not UTF-8")


def test_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "fabric.d"
    folder.mkdir()
    expect_bad(folder, capsys, "is a directory")


def test_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_bad(tmp_path / "nope.yaml", capsys, "cannot be read", "No such file")


def test_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod 0 does not stop root, so the refusal is simulated where the loader opens the file.
    path = write(tmp_path, BASE)
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", refuse)
    expect_bad(path, capsys, "cannot be read", "Permission denied")


def test_a_billion_laughs_bomb_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    started = time.monotonic()
    expect_bad(write(tmp_path, text), capsys, "after expanding aliases")
    assert time.monotonic() - started < 5


def test_a_bomb_of_mappings_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["x0: &x0 {k0: v, k1: v, k2: v, k3: v, k4: v, k5: v, k6: v, k7: v, k8: v, k9: v}"]
    for i in range(1, 10):
        lines.append(f"x{i}: &x{i} {{" + ", ".join(f"k{j}: *x{i - 1}" for j in range(10)) + "}")
    started = time.monotonic()
    expect_bad(write(tmp_path, "\n".join(lines) + "\n"), capsys, "after expanding aliases")
    assert time.monotonic() - started < 5


def test_a_recursive_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_bad(write(tmp_path, "sites: &s {east: *s}\n"), capsys, "nesting is too deep", "alias inside itself")


@pytest.mark.parametrize(("text", "line"), [
    pytest.param("sites: " + "[" * 20000 + "]" * 20000 + "\n", 1, id="flow-sequences"),
    pytest.param("sites: " + "{a: " * 20000 + "b" + "}" * 20000 + "\n", 1, id="flow-mappings"),
    pytest.param("".join(" " * i + "k:\n" for i in range(1500)), 64, id="block-mappings"),
])
def test_deep_nesting_fails_fast_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                               line: int) -> None:
    started = time.monotonic()
    expect_bad(write(tmp_path, text), capsys, "nesting deeper than 64 levels", line=line)
    assert time.monotonic() - started < 5


def test_nesting_deep_but_within_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Deeper than any fabric setting, within the nesting limit: an ordinary type error.
    text = "sites:\n  east: {description: " + "[" * 40 + "]" * 40 + "}\n"
    expect_bad(write(tmp_path, text), capsys, "sites.east.description", "valid string", line=2)


# --- values the model refuses ----------------------------------------------------------

def test_unknown_platform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    site: west\n    platform: kvm", "    site: west\n    platform: vmware")
    expect_bad(write(tmp_path, text), capsys, "servers.mgr-west.platform", "'hyperv' or 'kvm'",
               line=line_of(text, "vmware"))


@pytest.mark.parametrize("version", ["2013", "2012 R3", "vNext", "2019.1"])
def test_hyperv_version_that_is_not_a_system_center_release(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            version: str) -> None:
    text = edit("    platform: kvm\n    version: \"0.1.0\"\n  mgr-west",
                f"    platform: hyperv\n    version: \"{version}\"\n  mgr-west")
    expect_bad(write(tmp_path, text), capsys, "servers.mgr-east.version", f"'{version}'",
               "is not a System Center release", line=8)


def test_kvm_version_that_is_not_dotted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = edit("    platform: kvm\n    version: \"0.1.0\"\n  mgr-west",
                "    platform: kvm\n    version: \"latest\"\n  mgr-west")
    expect_bad(write(tmp_path, text), capsys, "servers.mgr-east.version", "not a dotted version", line=8)


@pytest.mark.parametrize("address", ["10.2.0.256", "host.example", "10.2.0", "::g", "''"])
def test_bad_ip_in_replication_address(tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str) -> None:
    text = edit("    replication_address: 10.2.0.11", f"    replication_address: {address}")
    expect_bad(write(tmp_path, text), capsys, "hosts.kvm-w1.replication_address", "is not an IP address",
               line=line_of(text, "10.2.0" if "10.2.0" in address else f"replication_address: {address}"))


def test_ipv6_replication_address_is_fine(tmp_path: Path) -> None:
    text = edit("    replication_address: 10.2.0.11", "    replication_address: \"fd00::11\"")
    assert load_fabric(write(tmp_path, text)).hosts["kvm-w1"].replication_address == "fd00::11"


@pytest.mark.parametrize(("old", "new", "field"), [
    pytest.param("  east: {}", "  \"bad name\": {}", "sites.bad name", id="name-with-space"),
    pytest.param("  east: {}", "  \"-east\": {}", "sites.-east", id="name-with-leading-dash"),
])
def test_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, field: str) -> None:
    expect_bad(write(tmp_path, edit(old, new)), capsys, field, "pattern", line=2)


def test_parse_fabric_names_its_source() -> None:
    with pytest.raises(FabricError) as info:
        parse_fabric("hostgroups: {}\n", "inline.yaml")
    assert info.value.path == "inline.yaml"
    assert info.value.problems == ["line 1: hostgroups: unknown key (check its spelling and the README's fabric reference)"]


def test_debug_shows_the_traceback_of_a_bad_file_but_keeps_exit_code_2(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "hostgroups: {}\n")
    assert run(["--debug", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "FabricError" in err
    assert str(path) in err
