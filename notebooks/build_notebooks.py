#!/usr/bin/env python3
"""Writes the notebooks (their cells live here, reviewable as code) and optionally runs them.

    python3 notebooks/build_notebooks.py            # write notebooks/*.ipynb without outputs
    python3 notebooks/build_notebooks.py --execute  # write and run them in place (outputs kept)
    python3 notebooks/build_notebooks.py --execute --out DIR   # run copies into DIR

Running needs nbclient, ipykernel, matplotlib and pandas, and a server (PG_GPT3_DSN, or the
throwaway cluster). PG_GPT3_NOTEBOOK_SIZE=small runs them at test size.
"""
import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text):
    return new_code_cell(text.strip("\n"))


QUICKSTART = [
    md("""
# pg_gpt3 quickstart

GPT-3 family models that live, train and generate *inside PostgreSQL*. This notebook talks to a
server through the Python package `pg_gpt3_client` (`pip install ./python`): it connects, loads
the real GPT-2/GPT-3 tokenizer, creates a model, generates (whole, streamed, by beam search) and
plots what the model thinks comes next.

It uses `$PG_GPT3_DSN`, or starts the repository's throwaway cluster.
"""),
    code("""
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import playbook
from pg_gpt3_client import UnknownModelError

db = playbook.connect()
print(len(db.models()), "registered models, e.g.", db.models()[:4])
pd.DataFrame([db.model_config(model=m) for m in ["gpt3-125m", "gpt3-1.3b", "gpt3-175b"]])[
    ["model", "n_layer", "d_model", "n_head", "d_head", "n_positions", "vocab", "attention_pattern"]]
"""),
    md("""
## A model

The registry holds the whole GPT-3 family. Parameters are rows of `llm_param`; `init_params`
draws GPT-3's initialisation for every tensor. The full run registers a model of GPT-3 Small's
shape (12 layers, 768 wide, 12 heads: 125 M parameters); the test run a 2-layer one. Fresh
weights are random, so the text below is noise: `reproduce_gpt3_small.ipynb` trains a model.
"""),
    code("""
# A model of its own (registering it anew leaves gpt3-125m's weights, if any, alone).
MODEL = "quickstart"
size = dict(n_layer=2, n_head=4, d_model=128) if playbook.SMALL else dict(n_layer=12, n_head=12, d_model=768)
t = time.perf_counter()
playbook.register(db, MODEL, n_positions=2048, **size)
n = db.query(f"SELECT sum(numel) AS n FROM llm_param_info WHERE model = '{MODEL}'")[0]["n"]
print(f"{n:,} parameters initialised in {time.perf_counter() - t:.1f} s")
vocab = db.load_tokenizer(playbook.TOKENIZER / "encoder.json", playbook.TOKENIZER / "vocab.bpe",
                          model=MODEL)
ids = db.encode("PostgreSQL is a database", model=MODEL)
print(vocab, "tokens in the vocabulary;", ids, "->", repr(db.decode(ids, model=MODEL)))
"""),
    md("## Generate"),
    code("""
print("greedy: ", repr(db.generate("PostgreSQL is", max_tokens=12, temperature=0, model=MODEL)))
print("sampled:", repr(db.generate("PostgreSQL is", max_tokens=12, temperature=0.8, top_k=40,
                                   model=MODEL, seed=1)))
"""),
    md("Streaming: each token arrives as the server produces it (`llm_generate_stream`)."),
    code("""
t0 = time.perf_counter()
arrivals = []
for event in db.stream("Once upon a time", max_tokens=24, model=MODEL, seed=2):
    arrivals.append(time.perf_counter() - t0)
    print(event.token, end="", flush=True)
print(f"\\n{len(arrivals)} tokens: first after {1e3 * arrivals[0]:.0f} ms, "
      f"{len(arrivals) / arrivals[-1]:.1f} tokens/s")
"""),
    code("""
pd.DataFrame(db.beam_search("The database", beam_width=4, max_tokens=6, model=MODEL))
"""),
    md("""
## What comes next

`logits` returns the `[T, vocab]` float32 logits as a NumPy array (fetched in binary). Below:
the next-token distribution after the prompt, and the model's uncertainty (entropy) at each
position.
"""),
    code("""
prompt = "PostgreSQL stores the weights of the model in a table"
ids = db.encode(prompt, model=MODEL)
logits = db.logits(ids, model=MODEL)
probs = np.exp(logits - logits.max(axis=1, keepdims=True))
probs /= probs.sum(axis=1, keepdims=True)
top = np.argsort(probs[-1])[::-1][:10]
entropy = -(probs * np.log(probs + 1e-12)).sum(axis=1)

fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.5))
a.barh([repr(db.decode([int(t)], model=MODEL)) for t in top][::-1], probs[-1, top][::-1])
a.set_title("next token after the prompt"); a.set_xlabel("probability")
b.plot(entropy, marker="o")
b.set_xticks(range(len(ids)), [db.decode([i], model=MODEL) for i in ids], rotation=60)
b.set_title("entropy of the prediction at each position (nats)")
plt.tight_layout(); plt.show()
print("logits", logits.shape, logits.dtype)
"""),
    code("""
try:
    db.generate("hi", model="gpt3-7b-typo")
except UnknownModelError as e:
    print(type(e).__name__, e.sqlstate, "-", e)
db.close()
"""),
]


REPRODUCE = [
    md("""
# Reproducing GPT-3 Small inside PostgreSQL

GPT-3 Small (Brown et al. 2020, table 2.1) trained with the paper's recipe: AdamW with β₁ 0.9,
β₂ 0.95, ε 1e-8, weight decay 0.1, gradient clipping at 1.0, a linear learning-rate warmup then
cosine decay to 10 % of the peak, peak 6e-4. The model, the data, the optimizer state and the
training log are all rows in the database; `llm_train` runs the steps inside the server.

Full scale needs 300 B tokens and far more than one machine. This notebook keeps the recipe and
scales the **model and the step count** down by one knob, `SCALE`, so it finishes in minutes on
2 cores; the table shows both.
"""),
    code("""
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

import playbook

db = playbook.connect()
SCALE = "test" if playbook.SMALL else "notebook"
run = {
    "test":     dict(n_layer=2, n_head=2, d_model=64,  seq_len=32,  batch_size=4, n_steps=12,  warmup=2),
    "notebook": dict(n_layer=4, n_head=4, d_model=256, seq_len=128, batch_size=8, n_steps=300, warmup=30),
}[SCALE]
paper = dict(n_layer=12, n_head=12, d_model=768, seq_len=2048, batch_size=256,
             n_steps=572_000, warmup=715)  # 0.5 M tokens per batch; warmup 375 M tokens
pd.DataFrame({"GPT-3 Small (paper)": paper, f"this run ({SCALE})": run}).T.assign(
    lr_max=6e-4, lr_min="10 %", beta2=0.95, weight_decay=0.1, grad_clip=1.0)
"""),
    md("""
## Model and data

A GPT-3-shaped model at the scaled width and depth, the real 50257-token tokenizer, and a
corpus of real English: this repository's documentation. The last document is held out as
the validation split.
"""),
    code("""
MODEL = "gpt3-small-repro"
playbook.register(db, MODEL, n_layer=run["n_layer"], n_head=run["n_head"],
                  d_model=run["d_model"], n_positions=2048)
db.load_tokenizer(playbook.TOKENIZER / "encoder.json", playbook.TOKENIZER / "vocab.bpe", model=MODEL)
n_params = db.query(f"SELECT sum(numel) AS n FROM llm_param_info WHERE model = '{MODEL}'")[0]["n"]
print(f"{n_params:,} parameters")

docs = sorted((playbook.REPO / "docs").glob("*.md")) + [playbook.REPO / "README.md"]
train_docs, validation_docs = docs[:-1], docs[-1:]
rows = db.prepare_dataset(train_docs, model=MODEL, block_size=run["seq_len"])
val_rows = db.prepare_dataset(validation_docs, model=MODEL, block_size=run["seq_len"], split="validation")
print(f"{rows} training rows and {val_rows} validation rows of {run['seq_len']} tokens")
"""),
    code("""
PROMPT = "The model is trained"
before = db.generate(PROMPT, max_tokens=20, temperature=0, model=MODEL)
val_before = db.eval(model=MODEL, split="validation")
print("before training:", repr(before))
print(f"validation perplexity {val_before['perplexity']:,.0f}")
"""),
    md("## Train\n\n`train` shows a progress bar and returns one row per step (`llm_train`)."),
    code("""
t = time.perf_counter()
steps = db.train(model=MODEL, n_steps=run["n_steps"], batch_size=run["batch_size"],
                 seq_len=run["seq_len"], lr_max=6e-4, warmup=run["warmup"],
                 beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1, grad_clip=1.0, seed=0)
minutes = (time.perf_counter() - t) / 60
print(f"{len(steps)} steps in {minutes:.1f} min, median {steps.tokens_per_s.median():,.0f} tokens/s")
steps.tail()
"""),
    code("""
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.5))
a.plot(steps.step, steps.loss, alpha=0.4, label="loss")
a.plot(steps.step, steps.loss.rolling(10, min_periods=1).mean(), label="mean of 10")
a.set_xlabel("step"); a.set_ylabel("cross-entropy (nats)"); a.legend(); a.set_title("training loss")
b.plot(steps.step, steps.lr)
b.set_xlabel("step"); b.set_title("learning rate: warmup, then cosine to 10 %")
plt.tight_layout(); plt.show()
"""),
    code("""
after = db.generate(PROMPT, max_tokens=20, temperature=0, model=MODEL)
val_after = db.eval(model=MODEL, split="validation")
print("before:", repr(before))
print("after: ", repr(after))
print(f"validation perplexity {val_before['perplexity']:,.0f} -> {val_after['perplexity']:,.1f}")
"""),
    md("""
## Keep it

An in-database checkpoint copies weights and AdamW state in one statement; the training log is
a table too.
"""),
    code("""
checkpoint = db.checkpoint_save(model=MODEL, note=f"{SCALE} run, {len(steps)} steps")
print(pd.DataFrame(db.checkpoints(model=MODEL))[["id", "note", "step", "n_params"]])
pd.DataFrame(db.query(f"SELECT step, loss, lr, grad_norm, tokens_per_s FROM llm_train_log "
                      f"WHERE model = '{MODEL}' ORDER BY step DESC LIMIT 5"))
"""),
    code("db.close()"),
]


IMPORT_INSPECT = [
    md("""
# Import a Hugging Face checkpoint and look inside

A tiny GPT-2 checkpoint is made here with NumPy in Hugging Face's own names and layouts
(`transformer.h.0.attn.c_attn.weight`, Conv1D weights stored `[in, out]`, the fused
query/key/value), written as `model.safetensors` + `config.json`, imported into the database,
checked against a reference forward pass (Hugging Face `transformers` when installed, else a
NumPy GPT-2), inspected with SQL and pandas, and exported back.
"""),
    code("""
import json
import struct
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import playbook

db = playbook.connect()
rng = np.random.default_rng(0)
n_layer, n_head, d, n_pos, vocab = (2, 2, 32, 64, 96) if playbook.SMALL else (4, 4, 128, 256, 512)

def tensor(*shape, std=0.02):
    return (rng.standard_normal(shape) * std).astype(np.float32)

weights = {"transformer.wte.weight": tensor(vocab, d), "transformer.wpe.weight": tensor(n_pos, d, std=0.01),
           "transformer.ln_f.weight": 1 + tensor(d, std=0.1), "transformer.ln_f.bias": tensor(d)}
for i in range(n_layer):
    p = f"transformer.h.{i}."
    weights.update({
        p + "ln_1.weight": 1 + tensor(d, std=0.1), p + "ln_1.bias": tensor(d),
        p + "attn.c_attn.weight": tensor(d, 3 * d, std=0.2), p + "attn.c_attn.bias": tensor(3 * d),
        p + "attn.c_proj.weight": tensor(d, d), p + "attn.c_proj.bias": tensor(d),
        p + "ln_2.weight": 1 + tensor(d, std=0.1), p + "ln_2.bias": tensor(d),
        p + "mlp.c_fc.weight": tensor(d, 4 * d), p + "mlp.c_fc.bias": tensor(4 * d),
        p + "mlp.c_proj.weight": tensor(4 * d, d), p + "mlp.c_proj.bias": tensor(d),
    })
config = {"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": d,
          "n_positions": n_pos, "vocab_size": vocab, "activation_function": "gelu_new",
          "layer_norm_epsilon": 1e-5, "architectures": ["GPT2LMHeadModel"]}

def write_safetensors(path, tensors):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t, dtype="<f4").tobytes())

checkpoint = Path(tempfile.mkdtemp()) / "tiny-gpt2"
checkpoint.mkdir()
write_safetensors(checkpoint / "model.safetensors", weights)
(checkpoint / "config.json").write_text(json.dumps(config, indent=2))
print(sorted(p.name for p in checkpoint.iterdir()), f"{sum(t.size for t in weights.values()):,} parameters")
"""),
    md("## Import\n\nThe client uploads the files in pieces; the server maps names and layouts onto its canonical parameters."),
    code("""
MODEL = "tiny-gpt2"
db.execute(f"DELETE FROM llm_model_config WHERE model = '{MODEL}'")
print(db.import_checkpoint(checkpoint, model=MODEL), "parameters imported")
pd.DataFrame([db.model_config(model=MODEL)])
"""),
    md("## Same logits as the reference"),
    code("""
def gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

def layer_norm(x, g, b, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b

def numpy_gpt2(ids, keep_attention=False):
    w, T, hd = weights, len(ids), d // n_head
    x = (w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:T]).astype(np.float64)
    attention = []
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        q, k, v = np.split(h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"], 3, axis=-1)
        heads = lambda t: t.reshape(T, n_head, hd).transpose(1, 0, 2)
        scores = heads(q) @ heads(k).transpose(0, 2, 1) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True)); att /= att.sum(-1, keepdims=True)
        attention.append(att)
        y = (att @ heads(v)).transpose(1, 0, 2).reshape(T, d)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        x = x + gelu_new(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]) @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"])
    logits = x @ w["transformer.wte.weight"].T
    return (logits, attention) if keep_attention else logits

ids = [int(i) for i in rng.integers(0, vocab, 16)]
ours = db.logits(ids, model=MODEL)
try:
    import torch
    from transformers import GPT2LMHeadModel
    reference_name = "transformers"
    hf = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].numpy()
except ImportError:
    reference_name = "NumPy GPT-2 (transformers is not installed)"
    reference = numpy_gpt2(ids)
print(f"max |pg_gpt3 - {reference_name}| = {np.abs(ours - reference).max():.2e}")
assert np.allclose(ours, reference, atol=1e-4)
"""),
    md("""
## Inside, with SQL

Every tensor is rows of `llm_param` (chunked `bytea`); `llm_param_info` has one row per tensor.
"""),
    code("""
info = pd.DataFrame(db.query(
    f"SELECT name, shape, numel, chunks FROM llm_param_info WHERE model = '{MODEL}' ORDER BY name"))
info.head(12)
"""),
    code("""
# The norm of every weight, computed by the server's own kernel (pg_llm_norm over the bytea).
norms = pd.DataFrame(db.query(
    f"SELECT name, sqrt(sum(pg_llm_norm(data) ^ 2)) AS norm FROM llm_param "
    f"WHERE model = '{MODEL}' GROUP BY name ORDER BY name"))
norms["layer"] = norms.name.str.extract(r"layers\\.(\\d+)\\.").fillna("-")
norms["kind"] = norms.name.str.replace(r"layers\\.\\d+\\.", "", regex=True)
norms.pivot(index="kind", columns="layer", values="norm").round(3)
"""),
    md("""
## Attention patterns

The query/key weights of each layer come out of the table as float32 `bytea`; with the
embeddings they give layer 0's attention over a prompt (deeper layers need the layers before,
so they come from the reference forward pass, which the logits above showed to agree).
"""),
    code("""
def tensor_of(name):
    rows = db.query(f"SELECT shape, data FROM llm_param WHERE model = '{MODEL}' AND name = '{name}' ORDER BY chunk")
    return np.frombuffer(b"".join(r["data"] for r in rows), dtype="<f4").reshape(rows[0]["shape"])

wte, wpe = tensor_of("wte.weight"), tensor_of("wpe.weight")
q_w, k_w = tensor_of("layers.0.attn.q_proj.weight"), tensor_of("layers.0.attn.k_proj.weight")
x = wte[ids] + wpe[:len(ids)]
g, b = tensor_of("layers.0.ln_1.weight"), tensor_of("layers.0.ln_1.bias")
h = layer_norm(x, g, b)
q = (h @ q_w.T + tensor_of("layers.0.attn.q_proj.bias")).reshape(len(ids), n_head, -1).transpose(1, 0, 2)
k = (h @ k_w.T + tensor_of("layers.0.attn.k_proj.bias")).reshape(len(ids), n_head, -1).transpose(1, 0, 2)
scores = q @ k.transpose(0, 2, 1) / np.sqrt(d // n_head)
scores = np.where(np.tril(np.ones((len(ids), len(ids)), bool)), scores, -np.inf)
layer0 = np.exp(scores - scores.max(-1, keepdims=True)); layer0 /= layer0.sum(-1, keepdims=True)
_, attention = numpy_gpt2(ids, keep_attention=True)
assert np.allclose(layer0, attention[0], atol=1e-5)

fig, axes = plt.subplots(1, n_layer, figsize=(3.2 * n_layer, 3))
for i, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(attention[i].mean(0), cmap="viridis")
    ax.set_title(f"layer {i}, mean over heads"); ax.set_xlabel("key"); ax.set_ylabel("query")
plt.tight_layout(); plt.show()
"""),
    md("## Export back\n\nThe export is the Hugging Face GPT-2 layout again, streamed to this machine in pieces."),
    code("""
exported = Path(tempfile.mkdtemp()) / "exported"
files = db.export_checkpoint(exported, model=MODEL)
print(files)

def read_safetensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]], "<f4").reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}

back = read_safetensors(exported / "model.safetensors")
same = all(np.array_equal(back[name], weights[name]) for name in weights)
print(f"{len(back)} tensors back; every original tensor bit for bit equal: {same}")
assert same
db.close()
"""),
]


NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "reproduce_gpt3_small.ipynb": REPRODUCE,
    "import_and_inspect.ipynb": IMPORT_INSPECT,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run the notebooks")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write them")
    parser.add_argument("names", nargs="*", help="only these notebooks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        if args.names and name not in args.names and name.removesuffix(".ipynb") not in args.names:
            continue
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        })
        path = args.out / name
        if args.execute:
            from nbclient import NotebookClient

            print(f"running {name} ...", flush=True)
            NotebookClient(nb, timeout=1800, kernel_name="python3",
                           resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
