#!/usr/bin/env bash
# Set up .venv (first run only) and run the main job on the bundled model: `tmpdiff demo`.
# Extra arguments go to `tmpdiff demo` (default output: <repo>/demo-out, replaced by each run: --force).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
exec tmpdiff demo --force --out "${TMPDIFF_DEMO_OUT:-$REPO/demo-out}" "$@"
