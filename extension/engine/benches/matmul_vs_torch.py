#!/usr/bin/env python3
"""Side-by-side matrix-product throughput: pg_llm_engine vs PyTorch, same shapes, same threads.

Run from the repository root:  python3 extension/engine/benches/matmul_vs_torch.py [--threads N]
Needs PyTorch (pip install torch); builds the Rust side with `cargo build --release`.
Both sides time the best of five rounds of repeated products after a warm-up; the engine side
includes its output allocation, as `torch.matmul` does. The machine is shared and noisy, so the
two sides are measured alternately, ROUNDS times, and each keeps its best figure.
"""
import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = [(768, 768, 768), (512, 768, 3072), (1, 768, 50257)]


def torch_gflops(m, k, n, threads):
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(m, k, dtype=torch.float32)
    b = torch.randn(k, n, dtype=torch.float32)
    torch.matmul(a, b)
    flops = 2.0 * m * k * n
    reps = max(3, int(0.1e9 * threads / flops) + 1)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - start) / reps)
    return flops / best / 1e9


ROUNDS = 3


def build_engine(root):
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "-p", "pg_llm_engine", "--example", "bench_matmul"],
        cwd=root,
        check=True,
    )


def engine_gflops(threads, root):
    exe = os.path.join(root, "target", "release", "examples", "bench_matmul")
    args = [exe, str(threads)] + [f"{m},{k},{n}" for m, k, n in SHAPES]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return {(r["m"], r["k"], r["n"]): r["gflops"] for r in map(json.loads, out.splitlines())}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("PyTorch is not installed: pip install torch")
    build_engine(root)
    engine = {s: 0.0 for s in SHAPES}
    ref = {s: 0.0 for s in SHAPES}
    for _ in range(ROUNDS):
        for s, g in engine_gflops(args.threads, root).items():
            engine[s] = max(engine[s], g)
        for s in SHAPES:
            ref[s] = max(ref[s], torch_gflops(*s, args.threads))
    print(f"threads = {args.threads}, torch {torch.__version__}, best of {ROUNDS} alternating rounds")
    print(f"{'shape (m x k . k x n)':<24} {'engine GFLOP/s':>15} {'torch GFLOP/s':>14} {'ratio':>7}")
    for m, k, n in SHAPES:
        e, t = engine[(m, k, n)], ref[(m, k, n)]
        print(f"{f'{m}x{k} . {k}x{n}':<24} {e:>15.1f} {t:>14.1f} {e / t:>7.2f}")


if __name__ == "__main__":
    main()
