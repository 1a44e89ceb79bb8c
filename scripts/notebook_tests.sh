#!/usr/bin/env bash
# Runs every notebook headless (nbclient) at test size against $PG_GPT3_DSN (or the throwaway
# cluster), in the Python tests' virtual environment, into a scratch folder: the committed
# notebooks keep the outputs of their full-size run. Fails on the first cell that raises.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/target/python-venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import pg_gpt3_client" 2>/dev/null; then
    "$REPO_ROOT/scripts/python_tests.sh" >/dev/null
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check nbclient nbformat ipykernel matplotlib pandas
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
PG_GPT3_NOTEBOOK_SIZE=small "$VENV/bin/python" notebooks/build_notebooks.py --execute --out "$out"
# Every notebook left its plots.
"$VENV/bin/python" - "$out" <<'PY'
import sys
from pathlib import Path

import nbformat

for path in sorted(Path(sys.argv[1]).glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors and images > 0, (path.name, images, errors)
    print(f"notebook {path.name}: {len(nb.cells)} cells ran, {images} plots")
PY
