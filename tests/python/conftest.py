"""Fixtures of the Python package's tests: a server (PG_GPT3_DSN, else the throwaway cluster
of scripts/cluster.sh in a database of its own) and a tiny model with the real tokenizer."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
MODEL = "py-test"


def _own_cluster() -> str:
    subprocess.run(["bash", str(REPO / "scripts" / "cluster.sh"), "start"], check=True)
    base = "host=/tmp/pg_gpt3_cluster/sock port=54329 user=postgres"
    psql = ["psql", f"{base} dbname=postgres", "-X", "-q", "-c"]
    subprocess.run(psql + ["DROP DATABASE IF EXISTS pg_gpt3_py"], check=True)
    subprocess.run(psql + ["CREATE DATABASE pg_gpt3_py"], check=True)
    dsn = f"{base} dbname=pg_gpt3_py"
    subprocess.run(["psql", dsn, "-X", "-q", "-c", "CREATE EXTENSION pg_llm"], check=True)
    return dsn


def psql_value(dsn: str, sql: str) -> str:
    """One value read with psql (the observer side of a few tests; the package has no
    generic query call)."""
    done = subprocess.run(["psql", dsn, "-X", "-A", "-t", "-c", sql], check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


def rollbacks(db, dsn: str) -> int:
    """Transactions rolled back in this database so far, with `db`'s own counts flushed."""
    db.execute("SELECT pg_stat_force_next_flush()")
    return int(psql_value(dsn, "SELECT xact_rollback FROM pg_stat_database "
                               "WHERE datname = current_database()"))


@pytest.fixture(scope="session")
def dsn() -> str:
    if not os.environ.get("PG_GPT3_DSN"):
        os.environ["PG_GPT3_DSN"] = _own_cluster()
    return os.environ["PG_GPT3_DSN"]


@pytest.fixture
def db(dsn):
    from pg_gpt3_client import Client

    with Client(dsn) as client:
        yield client


def register(db, model: str, dims: str, seed: int = 1) -> None:
    """A model of GPT-3 layout with random weights, registered anew."""
    db.execute(f"DELETE FROM llm_model_config WHERE model = '{model}'")
    db.execute(
        "INSERT INTO llm_model_config (model, n_layer, n_head, d_model, d_head, d_ff, "
        f"n_positions, vocab) VALUES ('{model}', {dims})"
    )
    db.init_params(model=model, seed=seed)


def register_with_tokenizer(db, model: str, dims: str, seed: int = 1) -> None:
    """`register`, and the real GPT-2/3 tokenizer loaded for the model."""
    register(db, model, dims, seed)
    tok = FIXTURES / "tokenizer"
    db.load_tokenizer(tok / "encoder.json", tok / "vocab.bpe", model=model)


@pytest.fixture(scope="session")
def model(dsn) -> str:
    """A 2-layer model with the real 50257-token vocabulary and tokenizer."""
    from pg_gpt3_client import Client

    with Client(dsn) as db:
        register_with_tokenizer(db, MODEL, "2, 2, 64, 32, 256, 256, 50257")
    return MODEL


@pytest.fixture(scope="session")
def slow_model(dsn) -> str:
    """A model whose generation takes seconds (a 512-wide, 4-layer model with the real
    vocabulary and tokenizer): long enough for a cancel to find it running."""
    from pg_gpt3_client import Client

    with Client(dsn) as db:
        register_with_tokenizer(db, "py-slow", "4, 8, 512, 64, 2048, 512, 50257")
    return "py-slow"
