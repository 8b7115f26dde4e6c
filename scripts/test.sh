#!/usr/bin/env bash
# The whole test suite: set everything up, then run pytest (extra arguments pass through,
# e.g. `scripts/test.sh -m "not slow"` for the quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
