#!/usr/bin/env python3
"""Soak test (issue 20, point 7): generators, a trainer and an importer side by side.

For --minutes (default 10) on one database:
  8 generators  loop llm_generate_ids (32 new tokens, no early stop); --b-generators of them
                (default 2) generate with model B, the others with model A;
  a trainer     loops llm_train on model A (gpt3-125m; one step of 1 x 128 tokens a call);
  an importer   re-imports a ~500 MB checkpoint (A's initial weights, exported once to a file)
                into model B in a loop, alternating the path form and the bytes form (the
                bytes from pg_read_binary_file: libpq is far too slow sending 500 MB).
Every --sample-every seconds (default 30) it records each backend's RSS and private memory
(/proc/<pid>/smaps_rollup), the WAL written (pg_wal_lsn_diff of pg_current_wal_lsn), the
database size, pg_total_relation_size('llm_param'), dead tuples and autovacuum runs of
llm_param's TOAST table, and the weight-file directory's size.

Exits 1 on any error (the only cancels it sends stop the trainer and importer at the end and are
not errors) or when the memory guard stopped the run (MemAvailable below --min-free-gib).

  python3 scripts/hardening/soak.py [--minutes 10]
"""
import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hardening  # noqa: E402

hardening.bootstrap()
from psycopg.types.json import Jsonb  # noqa: E402
from hardening import MB, Looper, log  # noqa: E402

MODEL_A, MODEL_B = "gpt3-125m", "soak-b"


def trainer_step(conn):
    return len(conn.execute("SELECT step FROM llm_train(%s, 1, batch_size => 1, seq_len => 128)",
                            (MODEL_A,)).fetchall())


def importer_step(path):
    calls = [0]

    def step(conn):
        calls[0] += 1
        if calls[0] % 2:
            conn.execute("SELECT pg_llm_import_safetensors(%s, %s)", (path, MODEL_B))
        else:
            conn.execute("SELECT pg_llm_import_safetensors_bytes(pg_read_binary_file(%s), %s)", (path, MODEL_B))
        return 1
    return step


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:
                pass
    return total


def db_sample(conn, toast, lsn0):
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s), pg_database_size(current_database()), "
        "pg_total_relation_size('llm_param'), s.n_live_tup, s.n_dead_tup, s.autovacuum_count "
        "FROM pg_stat_all_tables s WHERE s.relid = %s", (lsn0, toast)).fetchone()
    return {"wal": int(row[0]), "db_size": row[1], "llm_param_size": row[2],
            "toast_live": row[3], "toast_dead": row[4], "toast_autovacuums": row[5]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--generators", type=int, default=8)
    ap.add_argument("--b-generators", type=int, default=2, help="of the generators, how many use model B")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sample-every", type=float, default=30)
    ap.add_argument("--min-free-gib", type=float, default=3.0,
                    help="stop the run when the host's MemAvailable falls below this (default 3)")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the database (and cluster) afterwards")
    args = ap.parse_args()

    server = hardening.Server("soak", 54462, keep=args.keep)
    try:
        with server.connect() as c:
            c.execute("SELECT llm_init_params(%s, 1)", (MODEL_A,))
            rng = hardening.seeded(args.seed)
            for _ in range(16):   # the trainer's rows (the trigger cuts targets off)
                c.execute("INSERT INTO llm_dataset (model, tokens) VALUES (%s, %s::int[])",
                          (MODEL_A, hardening.random_ids(rng, 257)))
            ckpt, config = server.checkpoint_file(MODEL_A)
            c.execute("SELECT pg_llm_import_safetensors(%s, %s, %s)", (ckpt, MODEL_B, Jsonb(config)))
            toast = c.execute("SELECT reltoastrelid FROM pg_class WHERE oid = 'llm_param'::regclass").fetchone()[0]
            lsn0 = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            log(f"soaking for {args.minutes} min")
            result = soak(server, args, ckpt, c, toast, lsn0)
    finally:
        server.close()

    table = hardening.markdown_table(
        ["t s", "tokens", "train steps", "imports", "Σ RSS MB", "Σ private MB", "generator private max MB",
         "trainer private MB", "importer private MB", "host MemAvailable MB", "WAL MB", "database MB",
         "llm_param MB", "TOAST dead tuples", "TOAST autovacuums", "weight files MB"],
        [[s["t"], s["tokens"], s["train_steps"], s["imports"], hardening.mb(s["rss_total"]),
          hardening.mb(s["private_total"]), hardening.mb(s["generator_private_max"]),
          hardening.mb(s["trainer_private"]), hardening.mb(s["importer_private"]),
          hardening.mb(s["mem_available"]), hardening.mb(s["wal"]), hardening.mb(s["db_size"]),
          hardening.mb(s["llm_param_size"]), s["toast_dead"], s["toast_autovacuums"],
          hardening.mb(s["cache_bytes"])] for s in result["samples"]]
        + [["after", "", "", "", "-", "-", "-", "-", "-", "-", hardening.mb(f["wal"]), hardening.mb(f["db_size"]),
            hardening.mb(f["llm_param_size"]), f["toast_dead"], f["toast_autovacuums"], "-"]
           for f in [result["final"]]])
    summary = hardening.markdown_table(
        ["minutes", "tokens/s (A / B)", "train steps", "imports", "errors", "WAL GB", "WAL MB/s",
         "database MB start → end (max)", "llm_param MB start → end (max)", "memory guard"],
        [[round(result["seconds"] / 60, 1),
          f"{result['tokens_per_s']} ({result['tokens_per_s_a']} / {result['tokens_per_s_b']})",
          result["train_steps"], result["imports"], len(result["errors"]),
          round(result["wal_bytes"] / (1 << 30), 2), round(result["wal_bytes"] / MB / result["seconds"], 1),
          f"{hardening.mb(result['db_size_start'])} → {hardening.mb(result['db_size_end'])} "
          f"({hardening.mb(result['db_size_max'])})",
          f"{hardening.mb(result['llm_param_start'])} → {hardening.mb(result['llm_param_end'])} "
          f"({hardening.mb(result['llm_param_max'])})",
          result["memory_guard"] or "-"]])
    ok = not result["errors"] and result["memory_guard"] is None
    hardening.emit(summary + "\n\n" + table,
                   dict(result, script="soak", commit=hardening.git_commit(),
                        extension=server.ext_version, ok=ok))
    sys.exit(0 if ok else 1)


def soak(server, args, ckpt, conn, toast, lsn0):
    stop = threading.Event()
    rng = hardening.seeded(args.seed + 1)
    gens = []
    for i in range(args.generators):
        model = MODEL_B if i < args.b_generators else MODEL_A
        gens.append(Looper(server, f"generator {i} ({model})", hardening.generate_step(
            model, hardening.random_ids(rng, 16), args.new_tokens, args.seed * 1000 + i * 100000), stop))
    trainer = Looper(server, "trainer", trainer_step, stop)
    importer = Looper(server, "importer", importer_step(ckpt), stop)
    everyone = gens + [trainer, importer]
    guard = hardening.MemoryGuard(args.min_free_gib * (1 << 30),
                                  lambda: (stop.set(), hardening.cancel_all(server, everyone)))
    samples = []
    start = time.perf_counter()

    def sample():
        mem = {lp.role: hardening.smaps(lp.pid) or {"rss": 0, "pss": 0, "private": 0} for lp in everyone}
        s = {"t": round(time.perf_counter() - start),
             "tokens": sum(g.done for g in gens), "train_steps": trainer.done, "imports": importer.done,
             "rss_total": sum(m["rss"] for m in mem.values()),
             "private_total": sum(m["private"] for m in mem.values()),
             "generator_private_max": max(mem[g.role]["private"] for g in gens),
             "trainer_private": mem["trainer"]["private"], "importer_private": mem["importer"]["private"],
             "mem_available": hardening.mem_available(),
             "cache_bytes": dir_bytes(os.path.join(server.data_dir, "pg_llm_cache")),
             "backends": {role: m for role, m in mem.items()}}
        s.update(db_sample(conn, toast, lsn0))
        samples.append(s)
        log(f"t={s['t']} s: {s['tokens']} tokens, {s['train_steps']} steps, {s['imports']} imports, "
            f"Σ private {s['private_total'] / MB:.0f} MB, llm_param {s['llm_param_size'] / MB:.0f} MB")

    sample()
    guard.start()
    for lp in everyone:
        lp.start()
    deadline = start + args.minutes * 60
    while not stop.is_set():
        stop.wait(min(args.sample_every, max(0.0, deadline - time.perf_counter())))
        if not stop.is_set():
            sample()
        if time.perf_counter() >= deadline:
            stop.set()
    # Generator calls are short and finish; a training or import call in flight is cancelled.
    hardening.cancel_all(server, [trainer, importer])
    for lp in everyone:
        lp.join()
    guard.stop.set()
    # After the end: what the run left in the database (rolled-back work included).
    final = db_sample(conn, toast, lsn0)
    seconds = max(g.last_end or start for g in gens) - start
    tokens_a = sum(g.done for g in gens[args.b_generators:])
    tokens_b = sum(g.done for g in gens[:args.b_generators])
    return {
        "seconds": round(seconds, 1), "generators": args.generators, "b_generators": args.b_generators,
        "tokens": tokens_a + tokens_b, "tokens_per_s": round((tokens_a + tokens_b) / seconds, 1),
        "tokens_per_s_a": round(tokens_a / seconds, 1), "tokens_per_s_b": round(tokens_b / seconds, 1),
        "train_steps": trainer.done, "train_calls": trainer.calls, "imports": importer.done,
        "errors": [e for lp in everyone for e in lp.errors],
        "provoked_cancels": sum(lp.expected_cancels for lp in everyone),
        "wal_bytes": final["wal"], "final": final,
        "db_size_start": samples[0]["db_size"], "db_size_end": final["db_size"],
        "db_size_max": max([s["db_size"] for s in samples] + [final["db_size"]]),
        "llm_param_start": samples[0]["llm_param_size"], "llm_param_end": final["llm_param_size"],
        "llm_param_max": max([s["llm_param_size"] for s in samples] + [final["llm_param_size"]]),
        "memory_guard": guard.tripped, "samples": samples,
    }


if __name__ == "__main__":
    main()
