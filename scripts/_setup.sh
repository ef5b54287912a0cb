# Sourced by demo.sh and test.sh: create .venv if missing and install the project into it.
# Idempotent: the install is skipped while pyproject.toml is unchanged since the last successful one.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
    # pyproject.toml requires Python 3.11: another one fails halfway through the install
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        echo "[setup] tmpdiff needs Python 3.11; $PY is $("$PY" --version 2>&1 || echo missing): install python3.11 or set PYTHON=/path/to/python3.11" >&2
        exit 2
    fi
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.tmpdiff-install-stamp"
WANT="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "[setup] installing tmpdiff and its pinned dependencies into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first and exactly: 2.13.0 resolves to the CPU build on this machine kind; letting another
    # package pull an unpinned torch would fetch a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e "$REPO[dev]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
