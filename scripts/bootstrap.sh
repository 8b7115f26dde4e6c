#!/usr/bin/env bash
# Install everything Standby and its tests need on a fresh Debian 12 machine (as root),
# idempotently: Debian packages, then a virtualenv in .venv with the locked Python deps.
# Called by scripts/demo.sh, scripts/test.sh and .ci/run; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev gcc           # the virtualenv (Debian's Python 3.11, for python3-libnbd later)
  qemu-utils                             # qemu-img: replica overlays and image checks
  rsync                                  # the peer the benchmarks measure against
  iproute2 iputils-ping                  # network namespaces as sites in tests
  e2fsprogs                              # small filesystems for full-disk tests
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients   # libvirtd (started by standby.testing.libvirtd)
  qemu-system-x86                        # the emulator libvirt drives (software emulation here)
  python3-libvirt python3-libnbd libnbd-bin                   # bindings (Debian-only; the venv sees them)
  iptables                               # libvirt networks apply firewall rules
  cpio gzip                              # the test guest's initramfs (written by standby.testing.guest; cpio to inspect it)
  postgresql                             # the production store; tests start a throwaway cluster (tests/store_fixtures.py)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter (not a pyenv one), so Debian-only bindings are visible later.
PY=/usr/bin/python3
stamp=.venv/.standby-lock
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -x .venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "bootstrap: preparing .venv"
  [[ -x .venv/bin/python ]] || "$PY" -m venv --system-site-packages .venv
  # pip's own exit status decides (a failed install stops here); its output is shown
  # without the "... is ignored" notes about the system site-packages
  pip_install() {
    local log rc=0
    log="$(mktemp)"
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
    grep -v "is ignored" "$log" >&2 || true
    rm -f "$log"
    return "$rc"
  }
  pip_install -r requirements.lock
  pip_install --no-deps -e .
  .venv/bin/python -c "import standby, typer, pydantic, zstandard, xxhash, cryptography" 
  echo "$want" > "$stamp"
fi
