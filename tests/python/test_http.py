"""The HTTP endpoint: a throwaway cluster of its own with pg_llm in shared_preload_libraries
and `pg_llm.http_enabled = on`, driven with the official `openai` package, with httpx and with
curl, as an application would. Completions must equal SQL generation (greedy and seeded),
requests decoded together must get exactly what they get alone, and bad input, missing
privileges, overload and a client that goes away must each get their documented answer."""
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import register_with_tokenizer
from own_cluster import Cluster, fresh_root, wait_healthy

ROOT = Path("/tmp/pg_gpt3_http_test")
HTTP_PORT = 54382
URL = f"http://127.0.0.1:{HTTP_PORT}"
MODEL = "http-test"
MAX_REQUESTS = 8
CLUSTER = Cluster(ROOT, "data", 54353, (
    "-c shared_preload_libraries=pg_llm -c pg_llm.http_enabled=on "
    f"-c pg_llm.http_port={HTTP_PORT} -c pg_llm.http_max_requests={MAX_REQUESTS} "
    "-c pg_llm.http_max_batch=8"))
PROMPTS = ["The quick brown fox", "Hello, world", "PostgreSQL is", "Once upon a time",
           "In the beginning", "GPT-3 is a", "Tables hold rows", "A B C D E F"]


def _value(db, sql: str):
    return next(iter(db.query(sql)[0].values()))


@pytest.fixture(scope="module")
def server():
    """(client as superuser, {role: API key}); MODEL has the real tokenizer, role `reader` may
    use every model, role `outsider` may use none."""
    from pg_gpt3_client import Client

    CLUSTER.stop()
    fresh_root(ROOT)
    try:
        CLUSTER.initdb()
        CLUSTER.start()
        with Client(CLUSTER.dsn()) as db:
            db.execute("CREATE EXTENSION pg_llm")
            register_with_tokenizer(db, MODEL, "2, 2, 64, 32, 256, 512, 50257")
            db.execute("CREATE ROLE reader; GRANT llm_reader TO reader; CREATE ROLE outsider")
            keys = {role: _value(db, f"SELECT llm_create_api_key('{role}', 'test')")
                    for role in ("reader", "outsider")}
            wait_healthy(URL, CLUSTER)
            yield db, keys
    finally:
        CLUSTER.stop()


def _openai(key: str):
    import openai

    return openai.OpenAI(base_url=f"{URL}/v1", api_key=key, max_retries=0, timeout=60)


def _sql_generate(db, prompt: str, n: int, temperature: float = 0.0, seed: int = 0) -> str:
    quoted = prompt.replace("'", "''")
    return _value(db, f"SELECT llm_generate('{quoted}', {n}, {temperature}, 0, 1.0, '{MODEL}', "
                      f"50256, {seed})")


def _metric(name: str, labels: str = "") -> float:
    """One sample of /metrics (pg_llm_ prefix left out)."""
    wanted = f"pg_llm_{name}{{{labels}}}" if labels else f"pg_llm_{name}"
    for line in httpx.get(f"{URL}/metrics", timeout=10).text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{wanted} is not in /metrics")


def test_completions_equal_sql_generation(server):
    db, keys = server
    client = _openai(keys["reader"])
    done = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0)
    assert done.object == "text_completion" and done.model == MODEL
    assert done.choices[0].text == _sql_generate(db, PROMPTS[0], 12)
    assert done.choices[0].finish_reason in ("length", "stop")
    prompt_ids = _value(db, f"SELECT llm_encode('{PROMPTS[0]}', '{MODEL}')")
    assert done.usage.prompt_tokens == len(prompt_ids)
    # Seeded sampling draws what SQL draws with the same seed.
    sampled = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10,
                                        temperature=0.8, seed=7)
    assert sampled.choices[0].text == _sql_generate(db, PROMPTS[1], 10, 0.8, 7)
    # A prompt of token ids, echoed back.
    echoed = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=4,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + _sql_generate(db, PROMPTS[0], 4)
    listed = [m.id for m in client.models.list().data]
    assert MODEL in listed and "gpt3-125m" in listed


def test_streaming_with_openai_and_curl(server):
    db, keys = server
    client = _openai(keys["reader"])
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _sql_generate(db, PROMPTS[2], 16)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == 16 or chunks[-2].choices[0].finish_reason == "stop"
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1, "text came in pieces"
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 16,
                       "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", f"{URL}/v1/completions", "-H",
                          f"Authorization: Bearer {keys['reader']}", "-H",
                          "Content-Type: application/json", "-d", body],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text


def test_requests_decoded_together_get_what_they_get_alone(server):
    db, keys = server
    # Long enough that each request outlasts the spread of their arrivals (at 24 tokens a
    # request of this tiny model took about as long as the eight threads took to send theirs,
    # and a loaded 2-core machine decoded them mostly one at a time: mean batch 1.87).
    new_tokens = 160
    alone = [_sql_generate(db, p, new_tokens) for p in PROMPTS]
    steps, rows = _metric("decode_steps_total"), _metric("decode_rows_total")
    results = [None] * len(PROMPTS)
    start = threading.Barrier(len(PROMPTS))

    def one(i):
        start.wait()
        results[i] = _openai(keys["reader"]).completions.create(
            model=MODEL, prompt=PROMPTS[i], max_tokens=new_tokens, temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    mean_batch = (_metric("decode_rows_total") - rows) / (_metric("decode_steps_total") - steps)
    assert mean_batch > 2, f"the requests were not decoded together (mean batch {mean_batch})"


def test_bad_requests_get_400_and_the_right_status(server):
    import openai

    db, keys = server
    headers = {"Authorization": f"Bearer {keys['reader']}"}
    post = lambda body: httpx.post(f"{URL}/v1/completions", content=body, headers=headers,
                                   timeout=30)
    for body, words in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"prompt": "x"}), "'model'"),
        (json.dumps({"model": MODEL}), "'prompt'"),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -1}), "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": "x", "temperature": 9}), "temperature"),
        (json.dumps({"model": MODEL, "prompt": "x", "top_p": 0}), "top_p"),
        (json.dumps({"model": MODEL, "prompt": "x", "n": 3}), "'n'"),
        (json.dumps({"model": MODEL, "prompt": "x", "logprobs": 2}), "logprobs"),
        (json.dumps({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json.dumps({"model": MODEL, "prompt": [99999999]}), "vocabulary"),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 100000}), "context"),
    ]:
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    client = _openai(keys["reader"])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _openai("sk-pgllm-wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    r = httpx.post(f"{URL}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30)
    assert r.status_code == 401 and "API key is required" in r.json()["error"]["message"]
    # A role without privileges on the model tables is refused by the database itself.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _openai(keys["outsider"]).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert refused.value.code == "42501" and refused.value.status_code == 403
    assert _metric("errors_total", 'sqlstate="42704"') >= 1


def _send(key: str, max_tokens: int, stream: bool) -> socket.socket:
    """A completion request on a raw socket (so that the test decides when it goes away)."""
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[3], "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
              b"Content-Type: application/json\r\n"
              + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
              + body)
    return s


def _open_stream(key: str, max_tokens: int) -> socket.socket:
    """A streaming completion with its first event read: the request is running."""
    s = _send(key, max_tokens, stream=True)
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return s


def test_overload_gets_429_with_retry_after(server):
    db, keys = server
    streams = [_open_stream(keys["reader"], 400) for _ in range(MAX_REQUESTS)]
    try:
        r = httpx.post(f"{URL}/v1/completions", timeout=30,
                       headers={"Authorization": f"Bearer {keys['reader']}"},
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for s in streams:
            s.close()
    # The slots come back once the streams are gone.
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(f"{URL}/v1/completions", timeout=30,
                       headers={"Authorization": f"Bearer {keys['reader']}"},
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        if r.status_code == 200:
            break
        assert r.status_code == 429 and time.monotonic() < deadline, r.text
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_generation(server, stream):
    db, keys = server
    cancelled = _metric("requests_cancelled_total")
    generated = _metric("generated_tokens_total")
    if stream:
        s = _open_stream(keys["reader"], 480)
    else:
        s = _send(keys["reader"], 480, stream=False)
        time.sleep(0.05)
    s.close()
    deadline = time.monotonic() + 10
    while _metric("requests_cancelled_total") < cancelled + 1:
        assert time.monotonic() < deadline, "the generation went on without its client"
        time.sleep(0.05)
    # No more tokens are produced for it, and it stopped well before its 480.
    before = _metric("generated_tokens_total")
    time.sleep(0.5)
    assert _metric("generated_tokens_total") == before
    assert before - generated < 480


def test_metrics_view_and_prometheus_text(server):
    db, keys = server
    _openai(keys["reader"]).completions.create(model=MODEL, prompt="x", max_tokens=3,
                                               temperature=0)
    text = httpx.get(f"{URL}/metrics", timeout=10).text
    for line in ("# TYPE pg_llm_time_to_first_token_seconds histogram",
                 'pg_llm_time_per_token_seconds_bucket{le="+Inf"}',
                 f'pg_llm_weight_version{{model="{MODEL}"}}',
                 "# TYPE pg_llm_requests_total counter"):
        assert line in text, line
    assert _metric("requests_total", 'source="http"') >= 1
    assert _metric("time_to_first_token_seconds_count") >= 1
    rows = db.query("SELECT metric, labels, value, scope FROM llm_stats")
    by_name = {(r["metric"], r["labels"]): r for r in rows}
    assert {r["scope"] for r in rows} == {"server"}, "counts are shared in shared memory"
    http_requests = by_name[("requests_total", 'source="http"')]["value"]
    assert http_requests == _metric("requests_total", 'source="http"')
    # SQL generation is counted into the same shared counters.
    sql_before = by_name[("requests_total", 'source="sql"')]["value"]
    _sql_generate(db, "x", 2)
    assert _metric("requests_total", 'source="sql"') == sql_before + 1
    assert "pg_llm_requests_total" in _value(db, "SELECT llm_metrics()")


def test_new_weights_are_served_after_a_write(server):
    db, keys = server
    client = _openai(keys["reader"])
    before = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=8,
                                       temperature=0).choices[0].text
    db.execute(f"SELECT llm_init_params('{MODEL}', 2)")
    after = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=8,
                                      temperature=0).choices[0].text
    assert after == _sql_generate(db, PROMPTS[4], 8)
    assert after != before
    version = _value(db, f"SELECT version FROM llm_model_config WHERE model = '{MODEL}'")
    assert _metric("weight_version", f'model="{MODEL}"') == version


def test_api_keys_are_stored_hashed_and_can_be_revoked(server):
    db, keys = server
    key = _value(db, "SELECT llm_create_api_key('reader', 'short-lived')")
    quoted = key.replace("'", "''")
    assert _value(db, "SELECT count(*) FROM llm_api_key WHERE key_digest = "
                      f"sha256(convert_to('{quoted}', 'UTF8'))") == 1
    assert _value(db, f"SELECT count(*) FROM llm_api_key WHERE key_digest::text LIKE "
                      f"'%{key[-12:]}%'") == 0
    key_id = _value(db, "SELECT max(id) FROM llm_api_keys() WHERE label = 'short-lived'")
    client = _openai(key)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
    assert _value(db, f"SELECT llm_revoke_api_key({key_id})") is True
    import openai

    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    # A role may not mint keys for a role whose privileges it lacks.
    from pg_gpt3_client.errors import PgGpt3Error

    db.execute("SET ROLE reader")
    try:
        with pytest.raises(PgGpt3Error) as refused:
            db.execute("SELECT llm_create_api_key('postgres')")
        assert refused.value.sqlstate == "42501"
        # ... and sees only its own keys.
        assert {r["role_name"] for r in db.query("SELECT role_name FROM llm_api_keys()")} \
            == {"reader"}
    finally:
        db.execute("RESET ROLE")


def test_requests_without_a_key_run_as_the_anonymous_role(server):
    db, keys = server
    body = {"model": MODEL, "prompt": PROMPTS[5], "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{URL}/v1/completions", json=body, timeout=30).status_code == 401
    db.execute("ALTER SYSTEM SET pg_llm.http_anonymous_role = 'reader'")
    db.execute("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 10
        while (r := httpx.post(f"{URL}/v1/completions", json=body, timeout=30)).status_code == 401:
            assert time.monotonic() < deadline, "the reload did not reach the worker"
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == _sql_generate(db, PROMPTS[5], 4)
        # An anonymous role without privileges is refused by the database.
        db.execute("ALTER SYSTEM SET pg_llm.http_anonymous_role = 'outsider'")
        db.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while (r := httpx.post(f"{URL}/v1/completions", json=body, timeout=30)).status_code == 200:
            assert time.monotonic() < deadline, "the reload did not reach the worker"
            time.sleep(0.1)
        assert r.status_code == 403 and r.json()["error"]["code"] == "42501"
    finally:
        db.execute("ALTER SYSTEM RESET pg_llm.http_anonymous_role")
        db.execute("SELECT pg_reload_conf()")


def test_training_steps_and_model_loads_are_counted(server):
    db, keys = server
    steps = _metric("training_steps_total")
    loads = _metric("model_loads_total")
    db.execute(f"SELECT llm_train_step('{MODEL}', '{{464, 2068, 7586}}', '{{2068, 7586, 21831}}', 1e-3)")
    assert _metric("training_steps_total") == steps + 1
    # The trainer's backend keeps the new weights (a cache hit next); the HTTP worker loads
    # the new version for its next request.
    hits = _metric("model_cache_hits_total")
    _sql_generate(db, "x", 1)
    assert _metric("model_cache_hits_total") == hits + 1
    _openai(keys["reader"]).completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert _metric("model_loads_total") == loads + 1


def test_several_workers_share_the_port():
    """pg_llm.http_workers = 2 on a cluster of its own: two workers listen on one port and
    requests on many connections are all served."""
    from pg_gpt3_client import Client

    root = Path("/tmp/pg_gpt3_http_workers_test")
    port = 54384
    cluster = Cluster(root, "data", 54354, (
        "-c shared_preload_libraries=pg_llm -c pg_llm.http_enabled=on "
        f"-c pg_llm.http_port={port} -c pg_llm.http_workers=2 "
        "-c pg_llm.http_anonymous_role=postgres"))
    cluster.stop()
    fresh_root(root)
    try:
        cluster.initdb()
        cluster.start()
        with Client(cluster.dsn()) as db:
            db.execute("CREATE EXTENSION pg_llm")
            register_with_tokenizer(db, MODEL, "1, 2, 32, 16, 64, 64, 50257", seed=3)
            workers = _value(db, "SELECT count(*) FROM pg_stat_activity "
                                 "WHERE backend_type = 'pg_llm http'")
            assert workers == 2
            expected = _sql_generate(db, PROMPTS[6], 6)
        wait_healthy(f"http://127.0.0.1:{port}", cluster)
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": MODEL, "prompt": PROMPTS[6], "max_tokens": 6, "temperature": 0}
        texts = [httpx.post(url, json=body, timeout=30).json()["choices"][0]["text"]
                 for _ in range(12)]
        assert texts == [expected] * 12
    finally:
        cluster.stop()


def test_a_terminated_worker_comes_back(server):
    """pg_terminate_backend (as DROP DATABASE ... WITH (FORCE) does) ends the worker; the
    postmaster starts it again after its restart time and it serves as before."""
    db, keys = server
    pid = _value(db, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_llm http'")
    assert _value(db, f"SELECT pg_terminate_backend({pid})") is True
    deadline = time.monotonic() + 30
    while _value(db, "SELECT count(*) FROM pg_stat_activity "
                     f"WHERE backend_type = 'pg_llm http' AND pid <> {pid}") == 0:
        assert time.monotonic() < deadline, "the worker was not started again:\n" + CLUSTER.log()
        time.sleep(0.2)
    wait_healthy(URL, CLUSTER)
    done = _openai(keys["reader"]).completions.create(model=MODEL, prompt=PROMPTS[7],
                                                      max_tokens=4, temperature=0)
    assert done.choices[0].text == _sql_generate(db, PROMPTS[7], 4)
