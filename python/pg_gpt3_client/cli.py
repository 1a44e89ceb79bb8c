"""``pg-gpt3``: pg_gpt3 from the command line (replaces pg_gpt2's helper scripts).

Every subcommand but ``convert`` talks to a server: ``--dsn`` or ``$PG_GPT3_DSN``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import DEFAULT_MODEL, Client, PgGpt3Error, _native


def _client(args) -> Client:
    if not args.dsn:
        raise SystemExit("pg-gpt3: no server: pass --dsn or set PG_GPT3_DSN")
    return Client(args.dsn)


def _convert(args) -> int:
    written = _native.convert_checkpoint(args.source, args.destination, args.config)
    print(f"wrote {written['parameters']} parameters ({written['family']} layout) to "
          f"{args.destination}")
    return 0


def _ingest_tokenizer(args) -> int:
    with _client(args) as db:
        vocab = db.load_tokenizer(args.vocab, args.merges, model=args.model)
    print(f"tokenizer of {vocab} tokens attached to {args.model}")
    return 0


def _prepare_dataset(args) -> int:
    from pathlib import Path

    with _client(args) as db:
        rows = db.prepare_dataset(
            [Path(s) for s in args.sources], model=args.model, block_size=args.block_size,
            stride=args.stride, split=args.split,
        )
    print(f"added {rows} rows of {args.block_size} tokens to {args.model} ({args.split})")
    return 0


def _generate(args) -> int:
    with _client(args) as db:
        print(args.prompt, end="", flush=True)
        events = db.stream(
            args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, model=args.model,
            eos_token=None if args.eos_token < 0 else args.eos_token, seed=args.seed,
        )
        for event in events:
            print(event.token, end="", flush=True)
        print()
    return 0


def _train(args) -> int:
    with _client(args) as db:
        steps = db.train(
            model=args.model, n_steps=args.n_steps, batch_size=args.batch_size,
            seq_len=args.seq_len, lr_max=args.lr_max, warmup=args.warmup, wd=args.wd,
            grad_clip=args.grad_clip, dropout_p=args.dropout_p, seed=args.seed,
            progress=not args.quiet,
        )
        records = steps.to_dict("records") if hasattr(steps, "to_dict") else [
            s.to_dict() for s in steps
        ]
        if records:
            last = records[-1]
            print(f"step {last['step']}: loss {last['loss']:.4f}, "
                  f"{last['tokens_per_s']:.0f} tokens/s")
        if args.checkpoint:
            print(f"saved checkpoint {db.checkpoint_save(model=args.model, note=args.checkpoint)}")
    return 0


def _import(args) -> int:
    with _client(args) as db:
        n = db.import_checkpoint(args.path, model=args.model)
    print(f"imported {n} parameters into {args.model}")
    return 0


def _export(args) -> int:
    with _client(args) as db:
        files = db.export_checkpoint(args.directory, model=args.model)
    for name, size in sorted(files.items()):
        print(f"{size:>14,}  {os.path.join(args.directory, name)}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="pg-gpt3",
        description="GPT-3 family language models inside PostgreSQL (pg_gpt3).",
    )
    top.add_argument("--dsn", default=os.environ.get("PG_GPT3_DSN"),
                     help="libpq connection string or URL (default: $PG_GPT3_DSN)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, handler, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    def model(p):
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")

    p = command("convert", _convert,
                "convert a Hugging Face or Megatron-LM checkpoint to pg_gpt3's canonical "
                "safetensors (no server needed)")
    p.add_argument("source", help="a .safetensors file, a sharded checkpoint's index, or a folder")
    p.add_argument("destination", help="the folder to write model.safetensors and config.json into")
    p.add_argument("--config", help="the checkpoint's config.json (default: the one beside it); "
                   "for Megatron-LM, its arguments with \"model_type\": \"megatron-lm\"")

    p = command("ingest-tokenizer", _ingest_tokenizer,
                "attach a byte-level BPE tokenizer from local files to a model")
    p.add_argument("vocab", help="encoder.json / vocab.json")
    p.add_argument("merges", help="vocab.bpe / merges.txt")
    model(p)

    p = command("prepare-dataset", _prepare_dataset,
                "tokenize text files on the server into training rows")
    p.add_argument("sources", nargs="+", help="UTF-8 text files")
    model(p)
    p.add_argument("--block-size", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between row starts (default: the block size, no overlap)")
    p.add_argument("--split", default="train", help="dataset split (default train)")

    p = command("generate", _generate, "generate text, printed as the tokens come")
    p.add_argument("prompt")
    model(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--eos-token", type=int, default=50256, help="-1: never stop early")
    p.add_argument("--seed", type=int, default=None)

    p = command("train", _train, "train on the model's dataset rows with a progress bar")
    model(p)
    p.add_argument("--n-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="default: the dataset's block length")
    p.add_argument("--lr-max", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="NOTE", default=None,
                   help="save an in-database checkpoint with this note afterwards")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("import", _import, "upload a Hugging Face checkpoint from this machine")
    p.add_argument("path", help="a .safetensors file, an index, a manifest or a folder")
    model(p)

    p = command("export", _export, "download a model as a Hugging Face checkpoint folder")
    p.add_argument("directory")
    model(p)
    return top


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except PgGpt3Error as e:
        code = f" [{e.sqlstate}]" if e.sqlstate else ""
        print(f"pg-gpt3 {args.command}: {e}{code}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # convert's own errors: a bad or missing file
        print(f"pg-gpt3 {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npg-gpt3 {args.command}: interrupted (the server call was cancelled)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
