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
# Every notebook left its plots and printed what it is there to show.
"$VENV/bin/python" - "$out" <<'PY'
import re
import sys
from pathlib import Path

import nbformat

expect = {
    # Streamed every token; logits of the whole vocabulary.
    "quickstart.ipynb": [r"^24 tokens: first after", r"^logits \(\d+, 50257\) float32$"],
    # Training lowered the validation perplexity (checked below), and a checkpoint was kept.
    "reproduce_gpt3_small.ipynb": [r"validation perplexity [\d,.]+ -> [\d,.]+", r"run, \d+ steps"],
    # Same logits as the reference; exported back bit for bit.
    "import_and_inspect.ipynb": [r"^max \|pg_gpt3 - ", r"bit for bit equal: True$"],
}
for path in sorted(Path(sys.argv[1]).glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors and images > 0, (path.name, images, errors)
    text = "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)
    for pattern in expect[path.name]:
        assert re.search(pattern, text, re.M), (path.name, pattern)
    if path.name == "reproduce_gpt3_small.ipynb":
        before, after = re.search(r"validation perplexity ([\d,.]+) -> ([\d,.]+)", text).groups()
        assert float(after.replace(",", "")) < float(before.replace(",", "")), (before, after)
    print(f"notebook {path.name}: {len(nb.cells)} cells ran, {images} plots")
PY
