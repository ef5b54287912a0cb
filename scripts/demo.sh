#!/usr/bin/env bash
# Set up .venv (first run only) and run the main job on both bundled models: `tmpdiff demo --t2i`.
# Extra arguments go to `tmpdiff demo` (default output: <repo>/demo-out, replaced by each run: --force).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
exec tmpdiff demo --t2i --force --out "${TMPDIFF_DEMO_OUT:-$REPO/demo-out}" "$@"
