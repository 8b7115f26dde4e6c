#!/usr/bin/env bash
# The main job on embedded defaults: set everything up, then run `standby demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/standby demo "$@"
