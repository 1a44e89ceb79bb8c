"""Hot standbys serve generation: a throwaway primary and a streaming standby made with
`pg_basebackup -R` (both local clusters of their own, whatever PG_GPT3_DSN says), every
read-only call run on the standby with the weights replicated from the primary, and every kind
of write on the primary (init, import, training) seen on the standby after replay
(own_cluster.py says what the clusters need)."""
import shutil
import time
from pathlib import Path

import pytest

from conftest import register_with_tokenizer
from own_cluster import Cluster, bindir, fresh_root, run, wait_healthy

ROOT = Path("/tmp/pg_gpt3_standby_test")
PORTS = {"primary": 54351, "standby": 54352}
MODEL = "standby-test"
PROMPT = "The quick brown fox"
STANDBY_HTTP_PORT = 54385
# The standby also serves HTTP (pg_llm preloaded there only).
OPTIONS = {"primary": "", "standby": "-c shared_preload_libraries=pg_llm "
                                     f"-c pg_llm.http_enabled=on -c pg_llm.http_port={STANDBY_HTTP_PORT}"}
CLUSTERS = {role: Cluster(ROOT, role, port, OPTIONS[role]) for role, port in PORTS.items()}


def _dsn(role: str) -> str:
    return CLUSTERS[role].dsn()


def _value(client, sql: str):
    rows = client.query(sql)
    return next(iter(rows[0].values()))


def _caught_up(primary, standby, timeout_s: float = 60) -> None:
    """Waits until the standby has replayed everything the primary has written so far."""
    lsn = _value(primary, "SELECT pg_current_wal_lsn()::text")
    deadline = time.monotonic() + timeout_s
    while not _value(standby, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"):
        assert time.monotonic() < deadline, f"the standby did not replay up to {lsn}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def servers():
    """(primary, standby) clients; the primary holds MODEL with the real tokenizer and a
    dataset, the standby was made from it by pg_basebackup -R and streams from it."""
    from pg_gpt3_client import Client

    for cluster in CLUSTERS.values():
        cluster.stop()
    fresh_root(ROOT)
    try:
        CLUSTERS["primary"].initdb()
        CLUSTERS["primary"].start()
        with Client(_dsn("primary")) as primary:
            primary.execute("CREATE EXTENSION pg_llm")
            register_with_tokenizer(primary, MODEL, "2, 2, 64, 32, 256, 64, 50257")
            primary.execute(
                "INSERT INTO llm_dataset (model, split, tokens) SELECT "
                f"'{MODEL}', s, array(SELECT (g * 7919 + k) % 50000 FROM generate_series(1, 33) g) "
                "FROM generate_series(1, 4) k, unnest(ARRAY['train', 'validation']) s")
        run([bindir() / "pg_basebackup", "-D", ROOT / "standby", "-R", "-X", "stream", "-c", "fast",
             "-d", _dsn("primary")])
        CLUSTERS["standby"].start()
        with Client(_dsn("primary")) as primary, Client(_dsn("standby")) as standby:
            yield primary, standby
    finally:
        for role in ("standby", "primary"):
            CLUSTERS[role].stop()
        shutil.rmtree(ROOT, ignore_errors=True)


# Every read-only call, as SQL whose one value is compared between primary and standby.
READ_CALLS = [
    f"SELECT md5(llm_logits('{{464, 2068, 7586}}', '{MODEL}'))",
    f"SELECT llm_generate('{PROMPT}', 8, 0.0, 0, 1.0, '{MODEL}', -1, 0)",
    f"SELECT llm_generate_ids('{{1, 2, 3}}', 8, 0.0, 0, 1.0, '{MODEL}', -1, 0)::text",
    f"SELECT llm_generate('{PROMPT}', 8, 0.9, 40, 0.95, '{MODEL}', -1, 7)",
    f"SELECT string_agg(token_id::text, ',' ORDER BY step) "
    f"FROM llm_generate_stream('{PROMPT}', 6, 0.0, 0, 1.0, '{MODEL}', -1)",
    f"SELECT string_agg(text || ':' || round(score::numeric, 4), '|' ORDER BY rank) "
    f"FROM llm_beam_search('{PROMPT}', 3, 5, '{MODEL}')",
    f"SELECT llm_encode('Hello, standby world', '{MODEL}')::text",
    f"SELECT llm_decode(llm_encode('Hello, standby world', '{MODEL}'), '{MODEL}')",
    f"SELECT round(llm_loss('{MODEL}', '{{464, 2068, 7586}}', '{{2068, 7586, 21831}}')::numeric, 5)",
    f"SELECT round(loss::numeric, 5) || '/' || tokens FROM llm_eval('{MODEL}', 'validation')",
]


def _answers(client):
    return [_value(client, sql) for sql in READ_CALLS]


def test_every_read_only_call_runs_on_the_standby(servers):
    primary, standby = servers
    _caught_up(primary, standby)
    assert _value(standby, "SELECT pg_is_in_recovery()") is True
    on_standby = _answers(standby)
    assert on_standby == _answers(primary)
    # The standby read the replicated tables into a weight file of its own and maps it.
    version = _value(standby, f"SELECT version FROM llm_model_config WHERE model = '{MODEL}'")
    files = standby.query(
        f"SELECT version, state FROM llm_weight_cache WHERE model = '{MODEL}'")
    assert files == [{"version": version, "state": "ready"}]
    # Writes are refused there, with PostgreSQL's read-only SQLSTATE.
    from pg_gpt3_client.errors import PgGpt3Error

    with pytest.raises(PgGpt3Error) as refused:
        standby.execute(f"SELECT llm_init_params('{MODEL}', 5)")
    assert refused.value.sqlstate == "25006", refused.value.message


@pytest.mark.parametrize("write", [
    f"SELECT llm_init_params('{MODEL}', 2)",
    # An import: the primary's own export of another state of the model, read back.
    f"SELECT pg_llm_import_safetensors_bytes(pg_llm_export_safetensors_bytes('{MODEL}'), '{MODEL}')",
    f"SELECT llm_train_step('{MODEL}', '{{464, 2068, 7586}}', '{{2068, 7586, 21831}}', 1e-2)",
    f"SELECT count(*) FROM llm_train('{MODEL}', 2, batch_size => 2, seq_len => 16)",
])
def test_the_standby_follows_writes_on_the_primary(servers, write):
    primary, standby = servers
    _caught_up(primary, standby)
    before = _answers(standby)
    version = _value(primary, f"SELECT version FROM llm_model_config WHERE model = '{MODEL}'")
    primary.execute(write)
    assert _value(primary, f"SELECT version FROM llm_model_config WHERE model = '{MODEL}'") > version
    _caught_up(primary, standby)
    after = _answers(standby)
    assert after == _answers(primary)
    if "import" not in write:
        # New weights give new logits (an import of the model's own export gives the same).
        assert after[0] != before[0]
    assert _value(standby, f"SELECT version FROM llm_model_config WHERE model = '{MODEL}'") \
        == _value(primary, f"SELECT version FROM llm_model_config WHERE model = '{MODEL}'")


def test_the_standby_serves_http(servers):
    """The HTTP endpoint of a hot standby: an API key made on the primary is replicated, and
    completions there equal the standby's (and the primary's) SQL generation."""
    import httpx

    primary, standby = servers
    key = _value(primary, "SELECT llm_create_api_key('postgres', 'standby test')")
    _caught_up(primary, standby)
    url = f"http://127.0.0.1:{STANDBY_HTTP_PORT}"
    wait_healthy(url, CLUSTERS["standby"])
    r = httpx.post(f"{url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    sql = f"SELECT llm_generate('{PROMPT}', 8, 0.0, 0, 1.0, '{MODEL}', 50256, 0)"
    assert r.json()["choices"][0]["text"] == _value(standby, sql) == _value(primary, sql)
