#!/usr/bin/env bash
# Builds the Python package with maturin into a virtual environment and runs pytest.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/target/python-venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check "maturin>=1.5,<2" pytest
build_log="$(mktemp)"
if ! (cd python && VIRTUAL_ENV="$VENV" "$VENV/bin/maturin" develop --release >"$build_log" 2>&1); then
    tail -n 40 "$build_log" >&2
    exit 1
fi
rm -f "$build_log"
"$VENV/bin/python" -m pytest -q tests/python
