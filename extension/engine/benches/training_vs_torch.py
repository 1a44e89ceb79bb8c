#!/usr/bin/env python3
"""GPT-3 Small training: pg_llm inside PostgreSQL vs Hugging Face transformers + PyTorch.

One optimiser step of the same shape (12 layers, 768 wide, 12 heads, 50257 vocabulary, 2048
positions), float32, batch 4 × 256 tokens, the same thread count, in one run. Both sides do the
whole step: forward, mean cross-entropy over the 1024 positions, backward, global gradient norm
clipped to 1.0, AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on tensors of two or more
dimensions, the tied head once through the embedding, none on biases and LayerNorm; lr 6e-4),
no dropout. Reports:
  step       steady-state seconds per step and tokens/s (1024 / step). pg_llm: the median of the
             per-step tokens_per_s that llm_train returns for steps 2..K+1 (step compute only);
             PyTorch: the median of K timed steps after one warm-up step
  overhead   pg_llm's per-call cost: the llm_train call's wall time minus the sum of its steps'
             compute (loading weights and AdamW moments, writing them back once at the end)
  memory     peak resident memory: the backend's VmHWM (a fresh connection per configuration)
             vs ru_maxrss of a separate Python process that only runs the PyTorch side
With --recompute pg_llm also runs with pg_llm.train_recompute = on (activations recomputed in
the backward pass), reported as a second column. With --precision bfloat16 or float16 both
sides also run a mixed-precision step, side by side with their float32 one: pg_llm with
pg_llm.train_precision, PyTorch with torch.autocast on the CPU for the forward and the loss
(plus torch.amp.GradScaler for float16); float32 weights and AdamW state on both. Before the measured calls one priming step
stores AdamW moments, so that every measured call reads and writes the same state (a model's
first call has no moments to read) whichever configuration runs first.

Usage (a server with pg_llm on this machine, e.g. scripts/cluster.sh start):
  PG_GPT3_DSN="host=/tmp/pg_gpt3_cluster/sock port=54329 user=postgres dbname=bench" \\
      python3 extension/engine/benches/training_vs_torch.py --threads 2 [--steps 5] [--recompute]
          [--precision bfloat16|float16] [--json out.json]
  python3 extension/engine/benches/training_vs_torch.py --torch-only --threads 2   # PyTorch side alone, JSON
  (--no-torch: the pg_llm side alone)
Needs: torch, transformers, psycopg. Initialises gpt3-125m in that database if it has no weights
(training then changes them), and replaces that model's rows of llm_dataset with random tokens.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

MODEL = "gpt3-125m"
BATCH, SEQ, ROWS = 4, 256, 64
LR, BETAS, EPS, WD, CLIP = 6e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
TOKENS_PER_STEP = BATCH * SEQ


def torch_side(threads, steps, precision="float32"):
    """Time PyTorch training steps in this process; returns a dict (run it in its own process)."""
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPT2Config(n_positions=2048, n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config).to(torch.float32).train()
    params = dict(model.named_parameters())  # the tied head appears once, as the embedding
    opt = torch.optim.AdamW([{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": WD},
                             {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS)
    # A new batch of random tokens each step, as pg_llm's steps walk its random dataset rows.
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(steps + 1)]

    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cpu") if precision == "float16" else None

    def step():
        rows = batches.pop()
        tokens, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=half, enabled=half is not None):
            logits = model(tokens).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            scaler.step(opt)
            scaler.update()
        return loss.item()

    losses = [step()]  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return {"precision": precision, "threads": threads, "steps": steps, "step_s": step_s, "tokens_per_s": TOKENS_PER_STEP / step_s,
            "best_step_s": min(times), "step_times": times, "losses": losses,
            "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def run_torch_subprocess(threads, steps, precision):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-only",
                          "--threads", str(threads), "--steps", str(steps), "--precision", precision],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare_database(dsn):
    import psycopg

    rng = random.Random(2)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_llm")
        if c.execute("SELECT count(*) FROM llm_param WHERE model = %s", (MODEL,)).fetchone()[0] == 0:
            print(f"initialising {MODEL} in the database ...", flush=True)
            c.execute("SELECT llm_init_params(%s, 1)", (MODEL,))
        with c.transaction():
            c.execute("DELETE FROM llm_dataset WHERE model = %s", (MODEL,))
            rows = []
            for _ in range(ROWS):
                ids = [rng.randrange(50257) for _ in range(SEQ + 1)]
                rows.append((MODEL, ids[:-1], ids[1:]))
            with c.cursor() as cur:
                cur.executemany("INSERT INTO llm_dataset (model, split, tokens, target) "
                                "VALUES (%s, 'train', %s::int[], %s::int[])", rows)


def train_sql(n_steps):
    return (f"SELECT step, loss, lr, grad_norm, tokens_per_s FROM llm_train('{MODEL}', "
            f"n_steps => {int(n_steps)}, batch_size => {BATCH}, seq_len => {SEQ}, lr_max => {LR!r})")


def prime(dsn, threads):
    """One training step, so that the model has stored AdamW moments: every measured call then
    loads weights and moments and writes both back (the first call of a model has no moments to
    read), whichever configuration runs first."""
    import psycopg

    print("priming: one llm_train step ...", flush=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET pg_llm.threads = {int(threads)}")
        conn.execute(train_sql(1)).fetchall()


def vm_status(pid):
    """VmHWM / VmRSS of a backend in KiB (None where /proc is not readable: server elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmHWM", "VmRSS"))}
    except OSError:
        return {}


def pg_side(dsn, threads, steps, recompute, precision="float32"):
    """One llm_train call of steps+1 steps in a fresh connection; returns a dict."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        # The previous call's write-back (1.5 GB) would otherwise still be flushed to disk by
        # the checkpointer while these steps run.
        try:
            conn.execute("CHECKPOINT")
        except psycopg.Error:
            pass
        conn.execute(f"SET pg_llm.threads = {int(threads)}")
        conn.execute(f"SET pg_llm.train_recompute = {'on' if recompute else 'off'}")
        conn.execute(f"SET pg_llm.train_precision = '{precision}'")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        sql = train_sql(steps + 1)
        t = time.perf_counter()
        rows = conn.execute(sql).fetchall()
        wall = time.perf_counter() - t
        status = vm_status(pid)
    if len(rows) != steps + 1:
        raise SystemExit(f"llm_train returned {len(rows)} rows, expected {steps + 1}")
    rates = [float(r[4]) for r in rows]
    compute = sum(TOKENS_PER_STEP / r for r in rates)
    tokens_per_s = statistics.median(rates[1:])
    return {"recompute": recompute, "precision": precision, "threads": threads, "steps": steps + 1,
            "step_s": TOKENS_PER_STEP / tokens_per_s, "tokens_per_s": tokens_per_s,
            "call_wall_s": wall, "compute_s": compute, "overhead_s": wall - compute,
            "vmhwm_gib": status["VmHWM"] / 2**20 if "VmHWM" in status else None,
            "vmrss_gib": status["VmRSS"] / 2**20 if "VmRSS" in status else None,
            "rows": [{"step": int(r[0]), "loss": float(r[1]), "lr": float(r[2]), "grad_norm": float(r[3]),
                      "tokens_per_s": float(r[4])} for r in rows]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5, help="timed steps K (pg_llm runs K+1, the first a warm-up)")
    ap.add_argument("--recompute", action="store_true", help="also run pg_llm with pg_llm.train_recompute = on")
    ap.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="also run both sides in this mixed precision (the PyTorch side alone: only it)")
    ap.add_argument("--json", metavar="PATH", help="write the numbers to PATH")
    ap.add_argument("--torch-only", action="store_true", help="run only the PyTorch side here, print JSON")
    ap.add_argument("--no-torch", action="store_true", help="measure only pg_llm")
    args = ap.parse_args()
    if args.torch_only:
        print(json.dumps(torch_side(args.threads, args.steps, args.precision)))
        return
    dsn = os.environ.get("PG_GPT3_DSN")
    if not dsn:
        raise SystemExit("set PG_GPT3_DSN to a database where pg_llm can be created")

    prepare_database(dsn)
    prime(dsn, args.threads)
    pg = [pg_side(dsn, args.threads, args.steps, False)]
    if args.recompute:
        pg.append(pg_side(dsn, args.threads, args.steps, True))
    mixed = args.precision != "float32"
    if mixed:
        pg.append(pg_side(dsn, args.threads, args.steps, False, args.precision))
    precisions = ["float32"] + ([args.precision] if mixed else [])
    torch_runs = [] if args.no_torch else [run_torch_subprocess(args.threads, args.steps, p) for p in precisions]

    short = {"float32": "", "bfloat16": " bf16", "float16": " fp16"}
    names = ([("pg_llm+recompute" if r["recompute"] else "pg_llm") + short[r["precision"]] for r in pg]
             + ["PyTorch" + short[t["precision"]] for t in torch_runs])
    pt = torch_runs[0] if torch_runs else None
    print(f"threads = {args.threads}, batch {BATCH} x {SEQ} tokens, float32 weights and moments"
          + (f", torch {pt['torch']}, transformers {pt['transformers']}" if pt else "")
          + f"; median of steps 2..{args.steps + 1} (pg_llm)"
          + (f" / {args.steps} steps after a warm-up (PyTorch)" if pt else ""))
    print(f"{'':30}" + "".join(f"{n:>18}" for n in names))
    runs = pg + torch_runs

    def row(label, cell):
        print(f"{label:30}" + "".join(f"{cell(r):>18}" for r in runs))

    def same_precision(runs_, r):
        return next((t for t in runs_ if t["precision"] == r["precision"]), None)

    gib = lambda v: "n/a" if v is None else f"{v:.2f}"
    row("step (s)", lambda r: f"{r['step_s']:.3f}")
    row("tokens/s", lambda r: f"{r['tokens_per_s']:.1f}")
    if torch_runs:
        row("ratio pg/torch (same prec.)", lambda r: f"{r['tokens_per_s'] / same_precision(torch_runs, r)['tokens_per_s']:.2f}")
    if mixed:
        row("ratio to own float32", lambda r: f"{r['tokens_per_s'] / (pg[0] if r in pg else torch_runs[0])['tokens_per_s']:.2f}")
    row("per-call overhead (s)", lambda r: f"{r['overhead_s']:.2f}" if "overhead_s" in r else "-")
    row("peak RSS (GiB)", lambda r: gib(r["vmhwm_gib"]) if "vmhwm_gib" in r else gib(r["maxrss_gib"]))
    row("first / last loss", lambda r: (f"{r['rows'][0]['loss']:.3f}/{r['rows'][-1]['loss']:.3f}" if "rows" in r
                                        else f"{r['losses'][0]:.3f}/{r['losses'][-1]:.3f}"))
    print("peak RSS: pg_llm = backend VmHWM, PyTorch = ru_maxrss of its own process")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "batch": BATCH, "seq_len": SEQ, "lr": LR,
                       "pg_llm": pg, "torch": torch_runs}, f, indent=1)
            f.write("\n")

if __name__ == "__main__":
    main()
