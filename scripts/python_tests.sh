#!/usr/bin/env bash
# Installs the Python package the way a user does (`pip install ./python`: maturin builds the
# native module in release mode, pip installs numpy and tqdm) into a virtual environment with
# pytest, pandas, openai and httpx (the HTTP endpoint's tests), checks that an sdist builds, and runs the Python tests.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/target/python-venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
pip=("$VENV/bin/pip" --quiet --disable-pip-version-check)
"${pip[@]}" install "maturin>=1.5,<2" pytest pandas "openai>=1.40" httpx
build_log="$(mktemp)"
if ! "${pip[@]}" install --force-reinstall --no-deps ./python >"$build_log" 2>&1 \
    || ! "${pip[@]}" install ./python >>"$build_log" 2>&1 \
    || ! "$VENV/bin/maturin" sdist --manifest-path python/Cargo.toml --out target/sdist >>"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    exit 1
fi
rm -f "$build_log"
ls target/sdist/pg_gpt3_client-*.tar.gz >/dev/null
"$VENV/bin/python" -m pytest -q tests/python
