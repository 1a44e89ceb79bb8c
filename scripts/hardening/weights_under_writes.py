#!/usr/bin/env python3
"""Generators' memory and throughput while the model is being written (issue 20, point 4).

8 connections loop `llm_generate_ids` on gpt3-125m (32 new tokens a call, no early stop) for
--seconds (default 60) in three scenarios:
  alone    nothing else runs;
  writer   another connection runs `UPDATE llm_param SET step = step WHERE model = 'gpt3-125m'
           AND name = 'wpe.weight'` every 3 s (each gives the model a new version);
  trainer  another connection runs llm_train on the same model continuously (one step of
           1 x 128 tokens a call, each call a new version); this scenario lasts until at least
           --min-train-calls (2) calls have finished, since one can outlast the window.
Every second each generator backend's memory is read from /proc/<pid>/smaps_rollup (anonymous
= memory no file backs, where a private copy of the weights would be; private = Private_Clean +
Private_Dirty, which also counts a shared weight file's pages while this backend is the only one
mapping them, as the first user of a new version is for a moment; Pss, Rss), and this database's
weight-file directory is listed (every `<version>.weights` and temporary `.tmp<pid>` name seen
counts as a file written).

Targets (the issue: N generators beside a writer keep about one copy of the weights): in every
scenario each generator's anonymous memory stays below 20 % of the weight bytes (no private
copy), and the generators' summed Pss averages below 2 copies of the weights (one shared copy
plus their working memory; 8 private copies would be 8). Exits 1 when a target fails,
a call fails, or the memory guard stopped a scenario (MemAvailable below --min-free-gib).

  python3 scripts/hardening/weights_under_writes.py [--seconds 60] [--scenarios alone,writer,trainer]
"""
import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hardening  # noqa: E402

hardening.bootstrap()
from hardening import MB, Looper, log  # noqa: E402

MODEL = "gpt3-125m"
PRIVATE_SHARE, PSS_COPIES = 0.20, 2.0


def update_step(conn):
    return conn.execute("UPDATE llm_param SET step = step WHERE model = %s AND name = 'wpe.weight'",
                        (MODEL,)).rowcount


def train_step(conn):
    return len(conn.execute("SELECT step FROM llm_train(%s, 1, batch_size => 1, seq_len => 128)",
                            (MODEL,)).fetchall())


def scenario(server, name, args, weight_bytes):
    stop = threading.Event()
    rng = hardening.seeded(args.seed)
    gens = [Looper(server, f"generator {i}", hardening.generate_step(
        MODEL, hardening.random_ids(rng, 16), args.new_tokens, args.seed * 1000 + i * 100000), stop)
        for i in range(args.generators)]
    for g in gens:   # map the weights first: the window measures steady generation
        g.conn.execute("SELECT llm_generate_ids('{1}', 1, 0.0, 1, 1.0, %s)", (MODEL,))
    other = None
    if name == "writer":
        other = Looper(server, "writer", update_step, stop, every=args.write_every)
    elif name == "trainer":
        other = Looper(server, "trainer", train_step, stop)
    everyone = gens + ([other] if other else [])
    guard = hardening.MemoryGuard(args.min_free_gib * (1 << 30),
                                  lambda: (stop.set(), hardening.cancel_all(server, everyone)))
    files_seen = set(server.cache_files())
    samples = []   # per second: {pid: smaps} of the generators, and the other's
    other_samples = []

    start = time.perf_counter()
    guard.start()
    for lp in everyone:
        lp.start()
    def more():
        # A training call can outlast the window: the trainer scenario goes on until it has
        # made --min-train-calls new versions (at most 5 windows).
        elapsed = time.perf_counter() - start
        return elapsed < args.seconds or (name == "trainer" and other.calls < args.min_train_calls
                                          and elapsed < 5 * args.seconds)

    while not stop.wait(1.0) and more():
        snap = {g.pid: hardening.smaps(g.pid) for g in gens}
        samples.append({p: m for p, m in snap.items() if m})
        if other is not None and hardening.smaps(other.pid):
            other_samples.append(hardening.smaps(other.pid))
        files_seen.update(server.cache_files())
    stop.set()
    if other is not None:   # generator calls are short and finish; a training call is stopped
        hardening.cancel_all(server, [other])
    for lp in everyone:
        lp.join()
    guard.stop.set()
    files_seen.update(server.cache_files())
    wall = max(g.last_end or start for g in gens) - start
    tokens = sum(g.done for g in gens)

    private = [m["private"] for s in samples for m in s.values()]
    anon = [m["anon"] for s in samples for m in s.values()]
    pss = [m["pss"] for s in samples for m in s.values()]
    rss = [m["rss"] for s in samples for m in s.values()]
    pss_sum = [sum(m["pss"] for m in s.values()) for s in samples]
    per_backend_max = {p: max(s[p]["private"] for s in samples if p in s) for p in samples[0]} if samples else {}
    errors = [e for lp in everyone for e in lp.errors]
    res = {
        "scenario": name, "seconds": round(wall, 1), "generators": len(gens),
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0,
        "calls": sum(g.calls for g in gens),
        "private_mean_mb": round(statistics.mean(private) / MB, 1) if private else None,
        "private_max_mb": round(max(private) / MB, 1) if private else None,
        "private_max_per_backend_mb": [round(v / MB, 1) for v in per_backend_max.values()],
        "anon_mean_mb": round(statistics.mean(anon) / MB, 1) if anon else None,
        "anon_max_mb": round(max(anon) / MB, 1) if anon else None,
        "pss_mean_mb": round(statistics.mean(pss) / MB, 1) if pss else None,
        "pss_max_mb": round(max(pss) / MB, 1) if pss else None,
        "rss_max_mb": round(max(rss) / MB, 1) if rss else None,
        "pss_sum_mean_mb": round(statistics.mean(pss_sum) / MB, 1) if pss_sum else None,
        "pss_sum_max_mb": round(max(pss_sum) / MB, 1) if pss_sum else None,
        "weight_files": len([f for f in files_seen if f.endswith(".weights")]),
        "temp_files": len([f for f in files_seen if ".tmp" in f]),
        "writes": other.done if other else 0,
        "other_private_max_mb": round(max(m["private"] for m in other_samples) / MB, 1) if other_samples else None,
        "errors": errors, "memory_guard": guard.tripped,
    }
    res["met"] = (bool(private) and not errors and guard.tripped is None
                  and max(anon) < PRIVATE_SHARE * weight_bytes
                  and statistics.mean(pss_sum) < PSS_COPIES * weight_bytes)
    log(f"{name}: {res['tokens_per_s']} tokens/s, anonymous max {res['anon_max_mb']} MB, "
        f"private max {res['private_max_mb']} MB, "
        f"summed Pss mean {res['pss_sum_mean_mb']} MB, files {res['weight_files']}+{res['temp_files']} tmp")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--generators", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--write-every", type=float, default=3.0)
    ap.add_argument("--scenarios", default="alone,writer,trainer")
    ap.add_argument("--min-train-calls", type=int, default=2,
                    help="the trainer scenario lasts until this many training calls finished (default 2)")
    ap.add_argument("--min-free-gib", type=float, default=3.0,
                    help="stop a scenario when the host's MemAvailable falls below this (default 3)")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the database (and cluster) afterwards")
    args = ap.parse_args()

    server = hardening.Server("writes", 54461, keep=args.keep)
    results = []
    try:
        with server.connect() as c:
            c.execute("SELECT llm_init_params(%s, 1)", (MODEL,))
            rng = hardening.seeded(args.seed)
            for _ in range(8):   # rows for the trainer (the trigger cuts targets off)
                c.execute("INSERT INTO llm_dataset (model, tokens) VALUES (%s, %s::int[])",
                          (MODEL, hardening.random_ids(rng, 257)))
            if c.execute("SELECT count(*) FROM llm_param WHERE model = %s AND name = 'wpe.weight'",
                         (MODEL,)).fetchone()[0] != 1:
                raise SystemExit(f"{MODEL} has no single 'wpe.weight' row for the writer to update")
            t = time.perf_counter()   # the first call also creates the AdamW moments' rows
            c.execute("SELECT count(*) FROM llm_train(%s, 1, batch_size => 1, seq_len => 128)", (MODEL,))
            log(f"a first training step alone took {time.perf_counter() - t:.1f} s")
            weight_bytes = c.execute("SELECT sum(length(data)) FROM llm_param WHERE model = %s",
                                     (MODEL,)).fetchone()[0]
        for name in args.scenarios.split(","):
            log(f"scenario {name}: {args.generators} generators for {args.seconds:.0f} s")
            results.append(scenario(server, name, args, weight_bytes))
    finally:
        server.close()

    rows = [[r["scenario"], r["tokens_per_s"], r["calls"], r["anon_mean_mb"], r["anon_max_mb"],
             r["private_mean_mb"], r["private_max_mb"],
             r["pss_mean_mb"], r["pss_max_mb"], r["pss_sum_mean_mb"], r["pss_sum_max_mb"],
             f"{r['weight_files']} (+{r['temp_files']} tmp)", r["writes"],
             r["other_private_max_mb"] if r["other_private_max_mb"] is not None else "-",
             len(r["errors"]) + (1 if r["memory_guard"] else 0), "yes" if r["met"] else "no"]
            for r in results]
    table = hardening.markdown_table(
        ["scenario", "tokens/s", "calls", "anonymous mean MB", "anonymous max MB",
         "private mean MB", "private max MB", "Pss mean MB",
         "Pss max MB", "Σ Pss mean MB", "Σ Pss max MB", "weight files", 
         "writes / train steps", "writer or trainer private max MB", "errors", "met"], rows)
    table += (f"\n\nPer generator backend, sampled every second; weights {weight_bytes / MB:.0f} MB; "
              f"targets: anonymous < {PRIVATE_SHARE * weight_bytes / MB:.0f} MB, "
              f"Σ Pss mean < {PSS_COPIES * weight_bytes / MB:.0f} MB.")
    ok = all(r["met"] for r in results)
    hardening.emit(table, {"script": "weights_under_writes", "commit": hardening.git_commit(),
                           "extension": server.ext_version, "weight_bytes": weight_bytes,
                           "ok": ok, "results": results})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
