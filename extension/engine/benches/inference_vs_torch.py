#!/usr/bin/env python3
"""GPT-3 Small inference: pg_llm inside PostgreSQL vs Hugging Face transformers + PyTorch.

Same shape (12 layers, 768 wide, 12 heads, 50257 vocabulary, 2048 positions), float32, the
same thread count, measured alternately in one run. Reports:
  decode   prompt 16 tokens, 64 new tokens, greedy, KV cache      tokens/s (new tokens / call time)
  prefill  logits for all positions of a 512-token input          tokens/s
  cold     first generation call in a new connection (weights mapped from the shared weight
           file), and the first call after the weights changed (read from llm_param, file written)
  cancel   time from a cancel request to the query's error, during a long decode and during
           a 2048-token prefill (worst case: inside large matrix products), worst of 5 each
  rss      resident memory of the measuring backend (VmRSS: private memory plus the mapped
           weight file, which all connections share) / float32 weight bytes

With --dtype bfloat16 or float16 both sides run the model's matrices in that dtype: pg_llm a
copy of gpt3-125m served in it (llm_set_weight_dtype; kernels widen the weights and accumulate
in float32), PyTorch the model converted with .to(dtype) (it computes in that dtype); pg_llm's
float32 decode runs in the same rounds on a second connection, for the ratio of the two.

Usage (a server with pg_llm, e.g. scripts/cluster.sh start):
  PG_GPT3_DSN="host=/tmp/pg_gpt3_cluster/sock port=54329 user=postgres dbname=bench" \\
      python3 extension/engine/benches/inference_vs_torch.py --threads 2
Needs: torch, transformers, psycopg. Creates and initialises gpt3-125m in that database if needed.
"""
import argparse
import os
import threading
import time

import psycopg
import torch
from transformers import GPT2Config, GPT2LMHeadModel

PROMPT, NEW, PREFILL, ROUNDS = 16, 64, 512, 3


def best(fn, rounds=ROUNDS):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cancel_latency(dsn, threads, sql, params, delay):
    """Seconds from conn.cancel() to the QueryCanceled error of a query started `delay` s before."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f"SET pg_llm.threads = {threads}")
    sent = []

    def cancel_later():
        time.sleep(delay)
        sent.append(time.perf_counter())
        conn.cancel_safe()

    canceller = threading.Thread(target=cancel_later)
    canceller.start()
    try:
        conn.execute(sql, params)
        raise SystemExit("the query finished before it was cancelled")
    except psycopg.errors.QueryCanceled:
        ended = time.perf_counter()
    canceller.join()
    conn.close()
    return ended - sent[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args()
    name = "gpt3-125m" if args.dtype == "float32" else f"gpt3-125m-{args.dtype}"
    dsn = os.environ.get("PG_GPT3_DSN")
    if not dsn:
        raise SystemExit("set PG_GPT3_DSN to a database where pg_llm can be created")

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_llm")
        if name != "gpt3-125m" and not c.execute("SELECT 1 FROM llm_model_config WHERE model = %s",
                                                  (name,)).fetchone():
            # A copy of the registry row under its own name, served in the dtype.
            cols = [r[0] for r in c.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'llm_model_config' "
                "AND column_name NOT IN ('model', 'version', 'owner', 'weight_dtype')")]
            c.execute(f"INSERT INTO llm_model_config (model, {', '.join(cols)}) "
                      f"SELECT %s, {', '.join(cols)} FROM llm_model_config WHERE model = 'gpt3-125m'", (name,))
        # A half-precision run also decodes the float32 model, in the same rounds.
        for model_name in dict.fromkeys(["gpt3-125m", name]):
            if c.execute("SELECT count(*) FROM llm_param WHERE model = %s", (model_name,)).fetchone()[0] == 0:
                print(f"initialising {model_name} in the database ...")
                c.execute("SELECT llm_init_params(%s, 0)", (model_name,))
                if model_name != "gpt3-125m":
                    c.execute("SELECT llm_set_weight_dtype(%s, %s)", (model_name, args.dtype))
        weight_bytes = c.execute("SELECT sum(length(data)) FROM llm_param WHERE model = %s", (name,)).fetchone()[0]

    prompt = [(i * 7919) % 50000 + 100 for i in range(PROMPT)]
    long_input = [(i * 104729) % 50000 + 100 for i in range(PREFILL)]

    gen_sql = f"SELECT llm_generate_ids(%s, %s, 0, 0, 1, '{name}', NULL)"

    def first_call():
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute(f"SET pg_llm.threads = {args.threads}")
        t = time.perf_counter()
        conn.execute(gen_sql, (prompt, 1)).fetchone()
        return conn, time.perf_counter() - t

    # The first call after a write reads the weights from llm_param and writes the shared
    # weight file; a no-op update of one parameter gives the model a new version.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE llm_param SET data = data WHERE model = %s AND name = 'ln_f.bias'", (name,))
    c, after_write = first_call()
    c.close()
    # Every later new connection maps that file. This connection then measures warm calls.
    conn, cold = first_call()
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

    def pg_decode():
        ids = conn.execute(gen_sql, (prompt, NEW)).fetchone()[0]
        assert len(ids) == NEW

    # Its own connection, so that the measuring backend's RSS holds one model.
    conn_float32 = psycopg.connect(dsn, autocommit=True) if args.dtype != "float32" else None

    def pg_decode_float32():
        sql = "SELECT llm_generate_ids(%s, %s, 0, 0, 1, 'gpt3-125m', NULL)"
        assert len(conn_float32.execute(sql, (prompt, NEW)).fetchone()[0]) == NEW

    def pg_prefill():
        conn.execute(f"SELECT length(llm_logits(%s, '{name}'))", (long_input,)).fetchone()

    # transformers + PyTorch on the same shape (GPT-3 Small = GPT-2 small with 2048 positions).
    torch.set_num_threads(args.threads)
    model = GPT2LMHeadModel(GPT2Config(n_positions=2048, n_embd=768, n_layer=12, n_head=12, vocab_size=50257)).eval()
    model = model.to(getattr(torch, args.dtype))
    tp = torch.tensor([prompt])
    tl = torch.tensor([long_input])

    def torch_decode():
        with torch.no_grad():
            out = model.generate(tp, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True,
                                 pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == PROMPT + NEW

    def torch_prefill():
        with torch.no_grad():
            model(tl)

    if conn_float32:
        conn_float32.execute(f"SET pg_llm.threads = {args.threads}")
        pg_decode_float32()  # warm-up
    pg_decode(), torch_decode(), pg_prefill(), torch_prefill()  # warm-up
    pg_d = pt_d = pg_p = pt_p = pg_d32 = float("inf")
    for _ in range(ROUNDS):  # alternate the sides against a noisy machine
        pg_d = min(pg_d, best(pg_decode, 1))
        if conn_float32:
            pg_d32 = min(pg_d32, best(pg_decode_float32, 1))
        pt_d = min(pt_d, best(torch_decode, 1))
        pg_p = min(pg_p, best(pg_prefill, 1))
        pt_p = min(pt_p, best(torch_prefill, 1))

    status = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith(("VmRSS", "Rss"))}
    print(f"threads = {args.threads}, dtype {args.dtype}, torch {torch.__version__}, "
          f"best of {ROUNDS} alternating rounds")
    print(f"{'':28} {'pg_llm':>12} {'PyTorch':>12} {'ratio':>7}")
    print(f"{'decode tokens/s (16+64)':28} {NEW / pg_d:12.1f} {NEW / pt_d:12.1f} {pt_d / pg_d:7.2f}")
    print(f"{'prefill tokens/s (512)':28} {PREFILL / pg_p:12.1f} {PREFILL / pt_p:12.1f} {pt_p / pg_p:7.2f}")
    if conn_float32:
        print(f"{'decode, pg_llm float32':28} {NEW / pg_d32:12.1f}   ({args.dtype} / float32 "
              f"{pg_d32 / pg_d:.2f}, same rounds)")
        conn_float32.close()
    decode_sql = f"SELECT llm_generate_ids(%s, 1900, 0, 0, 1, '{name}', NULL)"
    prefill_sql = f"SELECT length(llm_logits(%s, '{name}'))"
    prefill_input = [(i * 104729) % 50000 + 100 for i in range(2048)]
    cancel_decode = max(cancel_latency(dsn, args.threads, decode_sql, (prompt,), 0.5 + 0.2 * i) for i in range(5))
    cancel_prefill = max(cancel_latency(dsn, args.threads, prefill_sql, (prefill_input,), 0.3 + 0.37 * i) for i in range(5))
    print(f"{'cancel latency, decode (ms)':28} {cancel_decode * 1000:12.1f}   (worst of 5)")
    print(f"{'cancel latency, prefill (ms)':28} {cancel_prefill * 1000:12.1f}   (worst of 5, 2048 tokens)")
    print(f"{'cold first call (s)':28} {cold:12.3f}   (new connection)")
    print(f"{'first call after a write (s)':28} {after_write:12.3f}   (reads llm_param, writes the weight file)")
    mib = lambda k: f"{status[k] / 1024:.0f} MiB"
    print(f"{'backend RSS / weights':28} {status['VmRSS'] * 1024 / weight_bytes:12.2f}   "
          f"(VmRSS {mib('VmRSS')}: private {mib('RssAnon')}, weight file {mib('RssFile')}, "
          f"shared buffers {mib('RssShmem')}; weights {weight_bytes / 2**20:.0f} MiB)")
    conn.close()


if __name__ == "__main__":
    main()
