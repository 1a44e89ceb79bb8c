#!/usr/bin/env python3
"""Side-by-side matrix-product throughput from SQL: `pg_llm_matmul` called inside the server on
operands already in PL/pgSQL variables vs `torch.matmul`, same shapes, same data, same threads.

Usage (a server with pg_llm, e.g. scripts/cluster.sh start):
  PG_GPT3_DSN="host=/tmp/pg_gpt3_cluster/sock port=54329 user=postgres dbname=postgres" \\
      python3 extension/engine/benches/sql_matmul_vs_torch.py --threads 2
Needs: torch, psycopg.

The SQL side is a PL/pgSQL function that receives a and b once as bytea arguments and times
repeated `c := pg_llm_matmul(a, b, m, k, n)` with clock_timestamp(): the result is kept in a
variable, never sent to the client, so the figure is the call itself (argument access, product,
result value) plus PL/pgSQL's assignment. The machine is shared and noisy, so the two sides are
measured alternately, ROUNDS times, and each keeps its best figure. The engine alone
(`bench_matmul`, as matmul_vs_torch.py runs it) is measured in the same rounds, so what SQL
adds to the product is told apart from how the product itself compares with torch.
"""
import argparse
import os
import time

import psycopg
import torch

from matmul_vs_torch import SHAPES, build_engine, engine_gflops

ROUNDS = 3

BENCH_FUNCTION = """
CREATE FUNCTION pg_temp.matmul_seconds(a bytea, b bytea, m int, k int, n int, reps int)
RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    c bytea;
    t0 timestamptz;
    best float8 := 'infinity';
BEGIN
    c := pg_llm_matmul(a, b, m, k, n);  -- warm-up
    FOR r IN 1..5 LOOP
        t0 := clock_timestamp();
        FOR i IN 1..reps LOOP
            c := pg_llm_matmul(a, b, m, k, n);
        END LOOP;
        best := least(best, extract(epoch FROM clock_timestamp() - t0)::float8 / reps);
    END LOOP;
    IF length(c) <> 4 * m * n THEN
        RAISE 'pg_llm_matmul returned % bytes, expected %', length(c), 4 * m * n;
    END IF;
    RETURN best;
END $$
"""


def reps_for(m, k, n, threads):
    """Repetitions per timed batch: about 0.1 s of work at 100 GFLOP/s per thread."""
    return max(3, int(0.1e9 * threads / (2.0 * m * k * n)) + 1)


def torch_seconds(a, b, reps):
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    dsn = os.environ.get("PG_GPT3_DSN")
    if not dsn:
        raise SystemExit("set PG_GPT3_DSN to a database where pg_llm can be created")
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    build_engine(root)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    operands = {s: (torch.randn(s[0], s[1]), torch.randn(s[1], s[2])) for s in SHAPES}

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_llm")
        conn.execute(f"SET pg_llm.threads = {args.threads}")
        conn.execute(BENCH_FUNCTION)
        blobs = {s: (a.numpy().tobytes(), b.numpy().tobytes()) for s, (a, b) in operands.items()}
        # The same product on both sides: checked once, so the timings compare like with like.
        for (m, k, n), (a, b) in operands.items():
            got = conn.execute(
                "SELECT pg_llm_matmul(%s, %s, %s, %s, %s)", (*blobs[(m, k, n)], m, k, n)
            ).fetchone()[0]
            c = torch.frombuffer(bytearray(got), dtype=torch.float32).view(m, n)
            if not torch.allclose(c, torch.matmul(a, b), rtol=1e-4, atol=1e-3):
                raise SystemExit(f"pg_llm_matmul differs from torch.matmul on {m}x{k}x{n}")

        sql = {s: float("inf") for s in SHAPES}
        ref = {s: float("inf") for s in SHAPES}
        engine = {s: 0.0 for s in SHAPES}
        for _ in range(ROUNDS):
            for s, g in engine_gflops(args.threads, root).items():
                engine[s] = max(engine[s], g)
            for (m, k, n) in SHAPES:
                reps = reps_for(m, k, n, args.threads)
                seconds = conn.execute(
                    "SELECT pg_temp.matmul_seconds(%s, %s, %s, %s, %s, %s)",
                    (*blobs[(m, k, n)], m, k, n, reps),
                ).fetchone()[0]
                sql[(m, k, n)] = min(sql[(m, k, n)], seconds)
                ref[(m, k, n)] = min(ref[(m, k, n)], torch_seconds(*operands[(m, k, n)], reps))

    print(f"threads = {args.threads}, torch {torch.__version__}, best of {ROUNDS} alternating rounds")
    print(
        f"{'shape (m x k . k x n)':<24} {'SQL GFLOP/s':>12} {'engine GFLOP/s':>15}"
        f" {'torch GFLOP/s':>14} {'SQL/torch':>10} {'engine/torch':>13}"
    )
    for m, k, n in SHAPES:
        flops = 2.0 * m * k * n
        s, t = flops / sql[(m, k, n)] / 1e9, flops / ref[(m, k, n)] / 1e9
        e = engine[(m, k, n)]
        print(f"{f'{m}x{k} . {k}x{n}':<24} {s:>12.1f} {e:>15.1f} {t:>14.1f} {s / t:>10.2f} {e / t:>13.2f}")


if __name__ == "__main__":
    main()
