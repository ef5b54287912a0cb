#!/usr/bin/env bash
# Set up .venv (first run only) and run every test, slow ones included. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
ruff check tmpdiff scripts tests
exec python -m pytest --durations=15 "$@"  # the slowest tests listed: the suite must stay under 20 minutes
