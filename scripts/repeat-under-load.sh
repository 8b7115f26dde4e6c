#!/usr/bin/env bash
# The data plane's and the agent runtime's slow integration tests, N runs in a row
# (default 10), with every core kept busy by `stress-ng --cpu` beside them: the check of
# issue 16 that these tests hold on a loaded machine. Prints one line per run and exits
# non-zero if any run failed. `--no-stress` runs them without stress-ng (when a second
# suite already keeps the cores busy). Needs root (libvirt, namespaces) like the suite.
#
#   scripts/repeat-under-load.sh [N] [--no-stress]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=10
stress=1
for a in "$@"; do
  case "$a" in
    --no-stress) stress=0 ;;
    *[!0-9]*|"") echo "usage: $0 [N] [--no-stress]" >&2; exit 2 ;;
    *) runs=$a ;;
  esac
done
scripts/bootstrap.sh >/dev/null
TESTS=(tests/integration/test_replication.py tests/integration/test_receiver_takeover.py
       tests/integration/test_tls_hangup.py tests/integration/test_sender_link.py
       tests/integration/test_sender_agent_error.py tests/integration/test_cross_network.py
       tests/integration/test_fault_injection.py tests/integration/test_store.py
       tests/integration/test_agent_runtime.py)
logs=$(mktemp -d /tmp/standby-repeat-XXXXXX)
# one libvirtd for every run (a run's session would otherwise start and stop its own)
.venv/bin/python -m standby.testing.libvirtd start >/dev/null
pid=""
if [ "$stress" = 1 ]; then
  command -v stress-ng >/dev/null || { echo "stress-ng is not installed (apt-get install stress-ng)" >&2; exit 2; }
  stress-ng --cpu "$(nproc)" --timeout 0 >/dev/null 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null' EXIT
fi
failed=0
for i in $(seq 1 "$runs"); do
  t0=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider "${TESTS[@]}" >"$logs/run-$i.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || failed=$((failed + 1))
  echo "run $i: exit $rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$logs/run-$i.log")"
done
echo "$((runs - failed)) of $runs runs passed (logs in $logs)"
[ "$failed" = 0 ]
