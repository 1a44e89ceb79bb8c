"""Time and memory of checkpoint import and export for a large model (default gpt3-1.3b,
5.3 GB of float32), the way an operator would run them, each step in a fresh connection:

1. llm_init_params(model)                          -- make the weights
2. pg_llm_export_safetensors(folder, model)        -- float32, sharded at 5 GB, with manifest
3. pg_llm_import_safetensors(folder, copy, config) -- the float32 export back into a new model
4. pg_llm_import_safetensors(manifest, copy)       -- the manifest path (every sha256 checked)
5. the folder converted here to bfloat16 (round to nearest even, tensor by tensor) and
   imported                                        -- the half-size form GPT-3-era weights ship in

For each step: wall time, and the backend's peak resident memory (VmHWM, from /proc) plus
its peak private (RssAnon) and file-backed (RssFile: weight-file pages mapped) parts sampled
every 20 ms. Each copy's logits are compared with the original's: a GPT-3 model with banded
layers exports as GPT-Neo with GPT-3's score scale folded into the query weights, so the
float32 copy differs by float32 rounding; the manifest import must equal the folder import
exactly; the bfloat16 copy's deviation is reported. Needs the server on this machine (for
/proc), superuser, and disk for about six copies of the model (the model's tables and weight
file, one imported copy's at a time, the export, WAL).

    python extension/engine/benches/checkpoint_io.py [--model gpt3-1.3b] [--dir /tmp/ckio] [--json F]
"""

import argparse
import json
import os
import shutil
import struct
import threading
import time

import numpy as np
import psycopg

STATUS_KEYS = ("VmHWM", "RssAnon", "RssFile")


def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(STATUS_KEYS)}


def measured(dsn, sql, params=()):
    """Runs one statement in a fresh backend; returns (result, seconds, memory peaks in bytes)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        peaks = {"RssAnon": 0, "RssFile": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    s = status(pid)
                except OSError:
                    return
                for k in peaks:
                    peaks[k] = max(peaks[k], s.get(k, 0))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        try:
            result = conn.execute(sql, params).fetchone()[0]
        finally:
            seconds = time.perf_counter() - t0
            done.set()
            sampler.join()
        peaks["VmHWM"] = status(pid)["VmHWM"]
        return result, seconds, peaks


def to_bf16(src_dir, dst_dir):
    """Rewrites a float32 safetensors folder as bfloat16, tensor by tensor (bounded memory)."""
    os.makedirs(dst_dir, exist_ok=True)
    os.chmod(dst_dir, 0o755)
    for name in os.listdir(src_dir):
        src = os.path.join(src_dir, name)
        if name in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(src, os.path.join(dst_dir, name))
        if not name.endswith(".safetensors"):
            continue
        with open(src, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            start = 8 + n
            meta = header.pop("__metadata__", None)
            items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            out_header, at = {}, 0
            for key, info in items:
                numel = int(np.prod(info["shape"], dtype=np.int64))
                out_header[key] = {"dtype": "BF16", "shape": info["shape"], "data_offsets": [at, at + 2 * numel]}
                at += 2 * numel
            if meta is not None:
                out_header["__metadata__"] = meta
            text = json.dumps(out_header).encode()
            text += b" " * (-len(text) % 8)
            with open(os.path.join(dst_dir, name), "wb") as out:
                out.write(struct.pack("<Q", len(text)) + text)
                for key, info in items:
                    s, e = info["data_offsets"]
                    f.seek(start + s)
                    bits = np.frombuffer(f.read(e - s), dtype="<u4")
                    # Round to nearest even on the upper 16 bits (no NaNs in these weights).
                    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                    out.write(rounded.astype("<u2").tobytes())


def logits(dsn, model, ids):
    with psycopg.connect(dsn, autocommit=True) as conn:
        raw = conn.execute("SELECT llm_logits(%s, %s)", (ids, model)).fetchone()[0]
    return np.frombuffer(raw, dtype="<f4")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt3-1.3b")
    ap.add_argument("--dir", default="/tmp/pg_gpt3_checkpoint_io")
    ap.add_argument("--json")
    args = ap.parse_args()
    dsn = os.environ.get("PG_GPT3_DSN")
    if not dsn:
        raise SystemExit("set PG_GPT3_DSN to a database with pg_llm installed")
    model, f32_dir, bf16_dir = args.model, os.path.join(args.dir, "f32"), os.path.join(args.dir, "bf16")
    copies = [f"{model}-f32-copy", f"{model}-bf16-copy", f"{model}-manifest-copy"]
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    os.chmod(args.dir, 0o777)  # the server writes the export here
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM llm_model_config WHERE model = ANY(%s)", (copies,))
        conn.execute("CHECKPOINT")

    steps = []

    def step(label, sql, params=()):
        result, seconds, peaks = measured(dsn, sql, params)
        steps.append({"step": label, "seconds": seconds, "result": result, **{k: v for k, v in peaks.items()}})
        gib = lambda b: b / 2**30
        print(f"{label:<34} {seconds:7.1f} s   peak RSS {gib(peaks['VmHWM']):5.2f} GiB "
              f"(private {gib(peaks['RssAnon']):5.2f}, weight file {gib(peaks['RssFile']):5.2f})", flush=True)
        return result

    n = step("llm_init_params", "SELECT llm_init_params(%s, 1)", (model,))
    print(f"  {n} parameters, {4 * n / 1e9:.2f} GB float32")
    ids = [464, 3290, 286, 4881, 318, 6342, 13]
    want = logits(dsn, model, ids)
    step("export (float32 folder)", "SELECT pg_llm_export_safetensors(%s, %s)", (f32_dir, model))
    config = json.dumps(json.load(open(os.path.join(f32_dir, "config.json"))))
    got = {}

    def import_step(label, path, copy):
        # Each copy is checked and dropped before the next: disk for one copy at a time.
        step(label, "SELECT pg_llm_import_safetensors(%s, %s, %s)", (path, copy, config))
        got[copy] = logits(dsn, copy, ids)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM llm_model_config WHERE model = %s", (copy,))
            conn.execute("VACUUM llm_param")

    import_step("import (float32 folder)", f32_dir, copies[0])
    import_step("import (manifest, sha256 checked)", os.path.join(f32_dir, "model.manifest.jsonl"), copies[2])
    t0 = time.perf_counter()
    to_bf16(f32_dir, bf16_dir)
    print(f"  (bfloat16 copy written in {time.perf_counter() - t0:.1f} s)")
    import_step("import (bfloat16 folder)", bf16_dir, copies[1])

    manifest_same = bool(np.array_equal(got[copies[0]], got[copies[2]]))
    f32_dev = float(np.max(np.abs(got[copies[0]] - want)))
    bf16_dev = float(np.max(np.abs(got[copies[1]] - want)))
    scale = float(np.max(np.abs(want)))
    print(f"max |logit| {scale:.3g}; max |Δlogit| float32 copy {f32_dev:.3g}, bfloat16 copy {bf16_dev:.3g}; "
          f"manifest import equal to folder import: {manifest_same}")
    sizes = {d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) for d in (f32_dir, bf16_dir)}
    print(f"export folder {sizes[f32_dir] / 1e9:.2f} GB, bfloat16 folder {sizes[bf16_dir] / 1e9:.2f} GB")
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "steps": steps, "max_abs_logit": scale,
                       "f32_max_abs_logit_diff": f32_dev, "bf16_max_abs_logit_diff": bf16_dev,
                       "manifest_equals_folder": manifest_same}, f, indent=1)
    if not manifest_same or f32_dev > 1e-4 * max(scale, 1.0):
        raise SystemExit("the float32 round trip changed the logits beyond float32 rounding")


if __name__ == "__main__":
    main()
