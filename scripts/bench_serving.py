#!/usr/bin/env python3
"""Serving throughput (issue 21, point 4): tokens/s of 1, 4 and 8 concurrent streams through
the HTTP endpoint (requests decoded together, one pass over the weights per step) against the
same numbers of SQL sessions calling llm_generate_ids (each decoding alone), side by side in one
run on gpt3-125m (random weights, the real tokenizer), with time to first token and time per
token of the HTTP streams. Greedy results must be the same at every concurrency (and the same
as SQL's): the script exits 1 otherwise.

Starts its own throwaway cluster (scripts/cluster.sh with pg_llm preloaded and the HTTP endpoint
on PG_GPT3_PORT + 51; PG_GPT3_DSN is ignored, since the endpoint is a server setting).

  python3 scripts/bench_serving.py [--tokens 64] [--rounds 2] [--streams 1,4,8] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hardening"))
import hardening  # noqa: E402

hardening.bootstrap(extra=("httpx",))
import httpx  # noqa: E402
from hardening import log  # noqa: E402

MODEL = "gpt3-125m"
PROMPTS = ["The quick brown fox", "Hello, world", "PostgreSQL is", "Once upon a time",
           "In the beginning", "GPT-3 is a", "Tables hold rows", "A B C D E F"]


def stream_one(url, key, prompt, tokens):
    """One streamed greedy completion: (text, tokens, time to first token, times between
    tokens)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first, gaps, text, used = None, [], [], None
    last = start
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["text"]:
                    now = time.monotonic()
                    if first is None:
                        first = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                    text.append(choice["text"])
    return "".join(text), used, first, gaps


def concurrently(n, work):
    """Runs work(i, barrier) on n threads that start together; returns the wall time."""
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=work, args=(i, barrier)) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start


def run_http(url, key, n, tokens, rounds):
    results = [None] * n

    def work(i, barrier):
        barrier.wait()
        results[i] = [stream_one(url, key, PROMPTS[i % len(PROMPTS)], tokens) for _ in range(rounds)]

    wall = concurrently(n, work)
    flat = [r for per in results for r in per]
    total = sum(r[1] for r in flat)
    return {
        "streams": n,
        "tokens_per_s": total / wall,
        "ttft_ms_median": 1e3 * statistics.median(r[2] for r in flat),
        "per_token_ms_median": 1e3 * statistics.median(g for r in flat for g in r[3]),
        "texts": [per[0][0] for per in results],
    }


def run_sql(server, n, tokens, rounds, prompt_ids):
    results = [None] * n

    def work(i, barrier):
        with server.connect() as c:
            c.execute("SELECT llm_generate_ids('{1}', 1, 0.0, 0, 1.0, %s, 50256, 0)", (MODEL,))
            barrier.wait()
            ids = prompt_ids[i % len(PROMPTS)]
            results[i] = [c.execute("SELECT llm_generate_ids(%s, %s, 0.0, 0, 1.0, %s, 50256, 0)",
                                    (ids, tokens, MODEL)).fetchone()[0] for _ in range(rounds)]

    wall = concurrently(n, work)
    return {"sessions": n, "tokens_per_s": sum(len(r) for per in results for r in per) / wall,
            "ids": [per[0] for per in results]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--json")
    args = ap.parse_args()
    counts = [int(v) for v in args.streams.split(",")]
    os.environ.pop("PG_GPT3_DSN", None)
    os.environ["PG_GPT3_HTTP_DATABASE"] = "pg_llm_hardening_serving"
    server = hardening.Server("serving", 54375)
    port = int(os.environ.get("PG_GPT3_PORT", "54375")) + 51
    url = f"http://127.0.0.1:{port}"
    try:
        with server.connect() as c:
            log(f"initialising {MODEL}")
            c.execute("SELECT llm_init_params(%s, 1)", (MODEL,))
            tok = os.path.join(hardening.REPO_ROOT, "tests", "fixtures", "tokenizer")
            vocab = open(os.path.join(tok, "encoder.json")).read()
            merges = open(os.path.join(tok, "vocab.bpe")).read()
            c.execute("SELECT llm_load_tokenizer(%s, %s, %s)", (MODEL, vocab, merges))
            key = c.execute("SELECT llm_create_api_key('postgres', 'bench')").fetchone()[0]
            prompt_ids = [c.execute("SELECT llm_encode(%s, %s)", (p, MODEL)).fetchone()[0]
                          for p in PROMPTS]
            threads = c.execute("SELECT current_setting('pg_llm.threads')").fetchone()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the HTTP endpoint at {url} did not come up")
            time.sleep(0.2)
        stream_one(url, key, "warm up", 2)
        http = {n: run_http(url, key, n, args.tokens, args.rounds) for n in counts}
        for n, r in http.items():
            log(f"HTTP {n} streams: {r['tokens_per_s']:.1f} tokens/s, TTFT {r['ttft_ms_median']:.0f} ms, "
                f"per token {r['per_token_ms_median']:.1f} ms")
        sql = {n: run_sql(server, n, args.tokens, args.rounds, prompt_ids) for n in counts}
        for n, r in sql.items():
            log(f"SQL {n} sessions: {r['tokens_per_s']:.1f} tokens/s")
        one = http[counts[0]]["tokens_per_s"]
        identical = all(r["texts"] == [http[counts[-1]]["texts"][i % len(PROMPTS)]
                                       for i in range(r["streams"])]
                        for r in http.values())
        sql_identical = all(r["ids"] == [sql[counts[-1]]["ids"][i % len(PROMPTS)]
                                         for i in range(r["sessions"])]
                            for r in sql.values())
        with server.connect() as c:
            sql_texts = [c.execute("SELECT llm_decode(%s, %s)", (ids, MODEL)).fetchone()[0]
                         for ids in sql[counts[-1]]["ids"]]
        http_equals_sql = http[counts[-1]]["texts"] == sql_texts[:len(http[counts[-1]]["texts"])]
        report = {
            "commit": hardening.git_commit(),
            "model": MODEL,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "pg_llm.threads": threads,
            "http": {n: {k: v for k, v in r.items() if k != "texts"} for n, r in http.items()},
            "sql": {n: {k: v for k, v in r.items() if k != "ids"} for n, r in sql.items()},
            "http_ratio_to_one_stream": {n: r["tokens_per_s"] / one for n, r in http.items()},
            "greedy_identical_across_concurrency": identical and sql_identical,
            "http_equals_sql": http_equals_sql,
        }
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        if not (identical and sql_identical and http_equals_sql):
            log("greedy results differ between concurrency levels or between HTTP and SQL")
            return 1
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
