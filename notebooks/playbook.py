"""Shared by the notebooks: find a server, and the size the notebook runs at.

A notebook connects to ``$PG_GPT3_DSN``; without it, it starts the repository's throwaway
cluster (``scripts/cluster.sh``) and uses a database of its own. ``PG_GPT3_NOTEBOOK_SIZE=small``
(what the test suite sets) shrinks each notebook's model and run so it finishes in seconds;
the default, ``full``, is the size the committed outputs were made at.
"""
import os
import subprocess
from pathlib import Path

from pg_gpt3_client import Client

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tests" / "fixtures" / "tokenizer"
SMALL = os.environ.get("PG_GPT3_NOTEBOOK_SIZE", "full") == "small"


def _throwaway_cluster() -> str:
    subprocess.run(["bash", str(REPO / "scripts" / "cluster.sh"), "start"], check=True,
                   capture_output=True)
    base = "host=/tmp/pg_gpt3_cluster/sock port=54329 user=postgres"
    exists = subprocess.run(
        ["psql", f"{base} dbname=postgres", "-X", "-A", "-t", "-c",
         "SELECT 1 FROM pg_database WHERE datname = 'pg_gpt3_notebooks'"],
        check=True, capture_output=True, text=True).stdout.strip()
    if not exists:
        subprocess.run(["psql", f"{base} dbname=postgres", "-X", "-q", "-c",
                        "CREATE DATABASE pg_gpt3_notebooks"], check=True)
    dsn = f"{base} dbname=pg_gpt3_notebooks"
    subprocess.run(["psql", dsn, "-X", "-q", "-c", "CREATE EXTENSION IF NOT EXISTS pg_llm"],
                   check=True)
    return dsn


def connect() -> Client:
    """A client on $PG_GPT3_DSN, or on the throwaway cluster."""
    return Client(os.environ.get("PG_GPT3_DSN") or _throwaway_cluster())


def register(db: Client, model: str, n_layer: int, n_head: int, d_model: int,
             n_positions: int, vocab: int = 50257) -> None:
    """(Re)registers a GPT-3-shaped model: d_head = d_model / n_head, MLP 4·d_model, the
    GPT-3 defaults for everything else, then random GPT-3 initialisation."""
    db.execute(f"DELETE FROM llm_model_config WHERE model = '{model}'")
    db.execute(
        "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, "
        f"n_positions, vocab) VALUES ('{model}', {n_layer}, {n_head}, {d_model}, "
        f"{d_model // n_head}, {4 * d_model}, {n_positions}, {vocab})"
    )
    db.init_params(model=model, seed=0)
