"""The Python client against a real server: every method, streaming arrival, Ctrl-C, the GIL,
errors as exception classes."""
import signal
import threading
import time

import numpy as np
import pytest

import pg_gpt3_client
from pg_gpt3_client import (
    BadInputError,
    Client,
    ConnectionFailedError,
    PermissionDeniedError,
    PgGpt3Error,
    QueryTimeoutError,
    UnknownModelError,
)

from conftest import psql_value, register, rollbacks


def test_generate_ids_and_text_agree(db, model):
    ids = db.encode("Hello, world", model=model)
    assert ids == [15496, 11, 995]
    assert db.decode(ids, model=model) == "Hello, world"
    greedy = dict(max_tokens=8, temperature=0.0, model=model, eos_token=None)
    new_ids = db.generate_ids(ids, **greedy)
    assert len(new_ids) == 8
    assert db.generate("Hello, world", **greedy) == db.decode(new_ids, model=model)
    # Seeded sampling repeats.
    sampled = dict(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, model=model, seed=7)
    assert db.generate("Hi", **sampled) == db.generate("Hi", **sampled)


def test_logits_are_a_float32_array_matching_greedy_choice(db, model):
    ids = db.encode("The quick brown fox", model=model)
    logits = db.logits(ids, model=model)
    assert isinstance(logits, np.ndarray)
    assert logits.dtype == np.float32 and logits.shape == (len(ids), 50257)
    assert logits.flags["C_CONTIGUOUS"] and logits.flags["WRITEABLE"]
    first = db.generate_ids(ids, max_tokens=1, temperature=0.0, model=model, eos_token=None)
    assert first == [int(np.argmax(logits[-1]))]


def test_stream_yields_tokens_as_they_are_produced(db, slow_model, dsn):
    events = db.stream("Once", max_tokens=60, temperature=0.0, model=slow_model, eos_token=None)
    first = next(events)
    # The first token reached us while the server was still producing the others (asked of
    # the server, not timed: a loaded machine cannot make it fail).
    generating = psql_value(dsn, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                 "AND query LIKE '%llm_generate_stream%' AND pid <> pg_backend_pid()")
    rest = list(events)
    assert generating == "1"
    assert first.step == 1 and not first.is_complete
    assert [e.step for e in rest] == list(range(2, 61))
    assert rest[-1].is_complete and rest[-1].text.endswith(rest[-1].token)
    assert "StreamEvent(step=1" in repr(first)


def test_a_stream_stopped_early_is_cancelled_and_one_read_to_its_end_is_not(db, slow_model, dsn):
    import gc

    # A cancelled generation is a rolled-back transaction; one read to its end commits.
    before = rollbacks(db, dsn)
    events = db.stream("Once", max_tokens=500, model=slow_model, eos_token=None, seed=1)
    next(events)
    events.close()
    assert list(events) == []
    assert rollbacks(db, dsn) == before + 1
    # Dropped without close (garbage-collected mid-generation): cancelled too.
    events = db.stream("Once", max_tokens=500, model=slow_model, eos_token=None, seed=2)
    next(events)
    del events
    gc.collect()
    assert rollbacks(db, dsn) == before + 2
    assert len(list(db.stream("Once", max_tokens=3, model=slow_model, eos_token=None))) == 3
    assert rollbacks(db, dsn) == before + 2
    assert db.encode("ok", model=slow_model) == [482]


def test_beam_search_returns_ranked_beams(db, model):
    beams = db.beam_search("Hello", beam_width=3, max_tokens=4, model=model)
    assert [b["rank"] for b in beams] == [1, 2, 3]
    assert beams[0]["score"] >= beams[-1]["score"]
    assert all(isinstance(b["text"], str) and len(b["token_ids"]) >= 1 for b in beams)


def test_loss_and_a_training_step(db):
    register(db, "py-step", "1, 2, 32, 16, 64, 32, 64")
    tokens = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    targets = [[2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]]
    before = db.loss(tokens, targets, model="py-step")
    assert db.train_step(tokens, targets, lr=1e-2, model="py-step") == before
    assert db.loss(tokens, targets, model="py-step") < before
    assert db.loss(tokens[0], targets[0], model="py-step") == db.loss(
        [tokens[0]], [targets[0]], model="py-step")
    assert db.loss(np.array(tokens), np.array(targets), model="py-step") == db.loss(
        tokens, targets, model="py-step")
    with pytest.raises(ValueError):
        db.loss([[1, 2], [3]], [[2, 3], [4]], model="py-step")


def test_mixed_precision_training_steps(db):
    register(db, "py-mixed", "1, 2, 32, 16, 64, 32, 64")
    tokens = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    targets = [[2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]]
    before = db.loss(tokens, targets, model="py-mixed")
    try:
        for precision in ("bfloat16", "float16"):
            db.set_train_precision(precision)
            db.train_step(tokens, targets, lr=1e-2, model="py-mixed")
        logged = db.query("SELECT precision, loss_scale, skipped FROM llm_train_log "
                          "WHERE model = 'py-mixed' ORDER BY id")
        assert [(r["precision"], r["loss_scale"] is None, r["skipped"]) for r in logged] == [
            ("bfloat16", True, False), ("float16", False, False)]
        assert db.loss(tokens, targets, model="py-mixed") < before
        with pytest.raises(BadInputError):
            db.set_train_precision("float8")
    finally:
        db.set_train_precision("float32")


def test_train_reports_progress_and_returns_records(db, capsys):
    register(db, "py-train", "1, 2, 32, 16, 64, 32, 64")
    db.dataset_upload_tokens([[i % 64 for i in range(k, k + 17)] for k in range(8)],
                             model="py-train")
    steps = db.train(model="py-train", n_steps=4, batch_size=2, lr_max=1e-3, seed=3)
    err = capsys.readouterr().err
    assert "training py-train" in err and "4/4" in err and "loss=" in err
    try:
        import pandas  # noqa: F401
        assert list(steps["step"]) == [1, 2, 3, 4]
        losses = list(steps["loss"])
    except ImportError:
        assert [s.step for s in steps] == [1, 2, 3, 4]
        losses = [s.loss for s in steps]
    assert all(np.isfinite(losses))
    stream = db.train_stream(model="py-train", n_steps=2, batch_size=2)
    records = list(stream)
    assert [r.step for r in records] == [5, 6]
    assert set(records[0].to_dict()) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    ev = db.eval(model="py-train", split="train")
    assert ev["sequences"] == 8 and ev["tokens"] == 8 * 16


def test_train_without_pandas_returns_a_list(db, monkeypatch):
    import builtins

    register(db, "py-train-list", "1, 2, 32, 16, 64, 32, 64")
    db.dataset_upload_tokens([list(range(9))] * 2, model="py-train-list")
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("no pandas here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    steps = db.train(model="py-train-list", n_steps=2, progress=False)
    assert [s.step for s in steps] == [1, 2]


def test_prepare_dataset_takes_files_and_strings(db, model, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 30
    n_tokens = len(db.encode(text, model=model))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    rows = db.prepare_dataset([path, text], model=model, block_size=64, split="py-prep")
    assert rows == 2 * -(-(n_tokens - 1) // 64)
    # The default block is GPT-3's 2048 tokens: this text makes one (shorter) row.
    assert db.prepare_dataset(text, model=model, split="py-prep-default") == 1


def test_checkpoints_round_trip_through_this_machines_disk(db, tmp_path):
    register(db, "py-export", "2, 2, 32, 16, 64, 32, 96", seed=4)
    files = db.export_checkpoint(tmp_path, model="py-export")
    assert set(files) == {"config.json", "model.safetensors", "model.manifest.jsonl"}
    assert all((tmp_path / n).stat().st_size == size for n, size in files.items())
    db.execute("DELETE FROM llm_model_config WHERE model = 'py-import'")
    assert db.import_checkpoint(tmp_path, model="py-import") > 0
    ids = [5, 6, 7]
    np.testing.assert_array_equal(db.logits(ids, model="py-import"),
                                  db.logits(ids, model="py-export"))
    assert db.model_config(model="py-import")["n_layer"] == 2


def test_in_database_checkpoints(db):
    register(db, "py-ckpt", "1, 2, 32, 16, 64, 32, 64")
    before = db.logits([1, 2], model="py-ckpt")
    ck = db.checkpoint_save(model="py-ckpt", note="first")
    db.init_params(model="py-ckpt", seed=9)
    assert not np.array_equal(db.logits([1, 2], model="py-ckpt"), before)
    listed = db.checkpoints(model="py-ckpt")
    assert [(c["id"], c["note"]) for c in listed] == [(ck, "first")]
    db.checkpoint_load(ck, model="py-ckpt")
    np.testing.assert_array_equal(db.logits([1, 2], model="py-ckpt"), before)


def test_half_precision_serving(db):
    register(db, "py-bf16", "1, 2, 32, 16, 64, 32, 64")
    float32 = db.logits([1, 2, 3], model="py-bf16")
    assert db.set_weight_dtype("bfloat16", model="py-bf16") > 0
    bf16 = db.logits([1, 2, 3], model="py-bf16")
    assert db.set_weight_dtype("float32", model="py-bf16") == 0
    np.testing.assert_allclose(db.logits([1, 2, 3], model="py-bf16"), bf16, atol=1e-5)
    assert np.abs(bf16 - float32).max() > 1e-5
    with pytest.raises(BadInputError):
        db.set_weight_dtype("int4", model="py-bf16")


def test_registry(db):
    cfg = db.model_config()
    assert (cfg["model"], cfg["n_layer"], cfg["d_model"]) == ("gpt3-125m", 12, 768)
    assert "gpt3-175b" in db.models()


def test_errors_are_python_exception_classes(db, model, dsn):
    with pytest.raises(UnknownModelError) as e:
        db.model_config(model="no-such-model")
    assert e.value.sqlstate == "42704" and isinstance(e.value, LookupError)
    with pytest.raises(BadInputError) as e:
        db.logits([60000], model=model)
    assert e.value.sqlstate == "22023" and isinstance(e.value, ValueError)
    db.execute("SET statement_timeout = '50ms'")
    with pytest.raises(QueryTimeoutError) as e:
        db.execute("SELECT pg_sleep(5)")
    assert e.value.sqlstate == "57014" and isinstance(e.value, TimeoutError)
    db.execute("SET statement_timeout = 0")
    db.execute("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'py_plain') "
               "THEN CREATE ROLE py_plain; END IF; END $$")
    with Client(dsn) as plain:
        plain.execute("SET ROLE py_plain")
        with pytest.raises(PermissionDeniedError) as e:
            plain.execute("SELECT pg_llm_import_safetensors('/nonexistent', 'x')")
        assert e.value.sqlstate == "42501"
    with pytest.raises(ConnectionFailedError) as e:
        Client("host=127.0.0.1 port=1 user=nobody connect_timeout=2")
    assert e.value.sqlstate is None and isinstance(e.value, ConnectionError)
    assert issubclass(BadInputError, PgGpt3Error)


def test_ctrl_c_cancels_the_running_query(db):
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(threading.main_thread().ident,
                                                            signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        db.execute("SELECT pg_sleep(20)")
    assert time.perf_counter() - t0 < 10
    # The query was cancelled on the server: the connection answers at once.
    db.execute("SELECT 1")


def test_the_gil_is_released_while_the_server_works(db):
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.01)

    thread = threading.Thread(target=ticker)
    thread.start()
    db.execute("SELECT pg_sleep(0.5)")
    stop.set()
    thread.join()
    assert len(ticks) >= 10


def test_client_lifecycle(dsn, monkeypatch):
    monkeypatch.setenv("PG_GPT3_DSN", dsn)
    with Client() as db:
        assert not db.closed and "open" in repr(db)
    assert db.closed
    with pytest.raises(RuntimeError):
        db.models()
    assert pg_gpt3_client.PGLLMClient is Client
    monkeypatch.delenv("PG_GPT3_DSN")
    with pytest.raises(ValueError):
        Client()


def test_async_client_awaits_streams_and_cancels(dsn, model):
    import asyncio

    from pg_gpt3_client import AsyncClient

    async def main():
        async with await AsyncClient.connect(dsn) as db:
            ids = await db.encode("Hello, world", model=model)
            assert ids == [15496, 11, 995]
            text = await db.generate("Hello", max_tokens=4, temperature=0.0, model=model,
                                     eos_token=None)
            steps = [e async for e in db.stream("Hello", max_tokens=4, temperature=0.0,
                                                model=model, eos_token=None)]
            assert steps[-1].is_complete and steps[-1].text == text
            # The event loop runs while a call waits on the server.
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            tick = asyncio.create_task(ticker())
            await db.execute("SELECT pg_sleep(0.3)")
            tick.cancel()
            assert ticks >= 5
            # Cancelling the awaiting task cancels the query on the server.
            slow = asyncio.create_task(db.execute("SELECT pg_sleep(20)"))
            await asyncio.sleep(0.3)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            await db.execute("SELECT 1")

    t0 = time.perf_counter()
    asyncio.run(main())
    assert time.perf_counter() - t0 < 15


def test_query_returns_rows_as_typed_dicts(db, model):
    import datetime

    (row,) = db.query(
        "SELECT 1::int2 AS a, 2::int8 AS b, 1.5::float4 AS c, 'x'::text AS d, "
        "'\\x0102'::bytea AS e, '{\"k\": [1]}'::jsonb AS f, ARRAY[1, NULL] AS g, "
        "ARRAY[0.5]::float8[] AS h, NULL::int AS i, true AS j, now() AS k"
    )
    assert list(row) == list("abcdefghijk")
    assert row["a"] == 1 and row["b"] == 2 and row["c"] == 1.5 and row["d"] == "x"
    assert row["e"] == b"\x01\x02" and row["f"] == {"k": [1]} and row["g"] == [1, None]
    assert row["h"] == [0.5] and row["i"] is None and row["j"] is True
    assert isinstance(row["k"], datetime.datetime) and row["k"].tzinfo is not None
    params = db.query(f"SELECT name, shape FROM llm_param WHERE model = '{model}' "
                      "AND chunk = 0 ORDER BY name")
    assert {"name": "wte.weight", "shape": [50257, 64]} in params
    from decimal import Decimal

    (n,) = db.query("SELECT 12345678901234567890::numeric AS a, -0.00123::numeric AS b, "
                    "10000.5::numeric AS c, 0::numeric AS d, sum(x) AS e, 'NaN'::numeric AS f "
                    "FROM (VALUES (1::int8), (2::int8)) v(x)")
    assert n["a"] == 12345678901234567890 and isinstance(n["a"], int)
    assert n["b"] == Decimal("-0.00123") and n["c"] == Decimal("10000.5")
    assert n["d"] == 0 and n["e"] == 3 and n["f"].is_nan()
    with pytest.raises(TypeError, match="cast it"):
        db.query("SELECT '1 day'::interval AS i")
    with pytest.raises(BadInputError):
        db.query("SELECT 1/0")


def test_the_same_new_tokenizer_loaded_by_two_connections_at_once(dsn, tmp_path):
    """Both loads succeed and share one stored tokenizer: the second insert waits for the
    first and then finds its row (once failed with 'SpiTupleTable positioned before the
    start', the row being invisible to the waiting statement's snapshot)."""
    from conftest import FIXTURES

    vocab = (FIXTURES / "tokenizer" / "encoder.json").read_text(encoding="utf-8")
    merges = (FIXTURES / "tokenizer" / "vocab.bpe").read_text(encoding="utf-8")
    for attempt in range(4):
        # Content no earlier run stored: a different amount of trailing whitespace.
        files = tmp_path / f"attempt{attempt}"
        files.mkdir()
        (files / "vocab.json").write_text(vocab + " " * (time.time_ns() % 997 + 1), encoding="utf-8")
        (files / "merges.txt").write_text(merges, encoding="utf-8")
        barrier = threading.Barrier(2)
        errors = []

        def load(i):
            try:
                with Client(dsn) as db:
                    register(db, f"py-tok-race-{i}", "1, 2, 16, 8, 64, 16, 50257")
                    barrier.wait()
                    db.load_tokenizer(files / "vocab.json", files / "merges.txt",
                                      model=f"py-tok-race-{i}")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with Client(dsn) as db:
            ids = db.query("SELECT DISTINCT tokenizer_id FROM llm_model_tokenizer "
                           "WHERE model LIKE 'py-tok-race-%'")
            assert len(ids) == 1, ids
