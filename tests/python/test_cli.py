"""The `pg-gpt3` command line: every subcommand, in-process and through the console script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pg_gpt3_client import Client
from pg_gpt3_client.cli import main

from conftest import FIXTURES, register

SUBCOMMANDS = ["convert", "ingest-tokenizer", "prepare-dataset", "generate", "train",
               "import", "export"]


def pg_gpt3(*args) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "pg-gpt3"
    return subprocess.run([str(script), *args], capture_output=True, text=True)


def test_console_script_has_help_for_every_subcommand():
    top = pg_gpt3("--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
        sub = pg_gpt3(name, "--help")
        assert sub.returncode == 0 and "usage: pg-gpt3 " + name in sub.stdout, sub.stderr


@pytest.mark.parametrize("source", ["models/gpt2", "models/opt", "megatron/v2",
                                    "models/gpt2_sharded/model.safetensors.index.json"])
def test_convert_makes_a_canonical_checkpoint_the_server_imports(dsn, source, tmp_path, capsys):
    out = tmp_path / "canonical"
    assert main(["convert", str(FIXTURES / source), str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "pg_gpt3"
    # Imported as it is, it computes what the original computes.
    original_dir = FIXTURES / source
    if original_dir.is_file():
        original_dir = original_dir.parent
    with Client(dsn) as db:
        for name in ["cli-original", "cli-canonical"]:
            db.execute(f"DELETE FROM llm_model_config WHERE model = '{name}'")
        db.import_checkpoint(original_dir, model="cli-original")
        db.import_checkpoint(out, model="cli-canonical")
        ids = [1, 2, 3, 4]
        np.testing.assert_array_equal(db.logits(ids, model="cli-canonical"),
                                      db.logits(ids, model="cli-original"))


def test_convert_reports_a_damaged_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((FIXTURES / "models/gpt2/config.json").read_bytes())
    (bad / "model.safetensors").write_bytes(
        (FIXTURES / "models/gpt2/model.safetensors").read_bytes()[:-10])
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 1
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_tokenizer_dataset_generate_train_import_export(dsn, tmp_path, capsys):
    with Client(dsn) as db:
        register(db, "cli-model", "1, 2, 32, 16, 64, 128, 50257")
    tok = FIXTURES / "tokenizer"
    base = ["--dsn", dsn]
    assert main(base + ["ingest-tokenizer", str(tok / "encoder.json"), str(tok / "vocab.bpe"),
                        "--model", "cli-model"]) == 0
    assert "50257 tokens" in capsys.readouterr().out

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Rows and columns, all the way down. " * 40, encoding="utf-8")
    assert main(base + ["prepare-dataset", str(corpus), "--model", "cli-model",
                        "--block-size", "32", "--stride", "16"]) == 0
    out = capsys.readouterr().out
    assert "rows of 32 tokens" in out
    assert int(out.split()[1]) > 10

    assert main(base + ["generate", "Rows and", "--model", "cli-model", "--max-tokens", "5",
                        "--temperature", "0", "--eos-token", "-1"]) == 0
    text = capsys.readouterr().out
    with Client(dsn) as db:
        expected = db.generate("Rows and", max_tokens=5, temperature=0.0, model="cli-model",
                               eos_token=None)
    assert text == "Rows and" + expected + "\n"

    assert main(base + ["train", "--model", "cli-model", "--n-steps", "3", "--batch-size", "2",
                        "--checkpoint", "cli run"]) == 0
    captured = capsys.readouterr()
    assert "step 3: loss" in captured.out and "saved checkpoint" in captured.out
    assert "3/3" in captured.err

    assert main(base + ["export", str(tmp_path / "exported"), "--model", "cli-model"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    with Client(dsn) as db:
        db.execute("DELETE FROM llm_model_config WHERE model = 'cli-copy'")
    assert main(base + ["import", str(tmp_path / "exported"), "--model", "cli-copy"]) == 0
    assert "imported" in capsys.readouterr().out
    with Client(dsn) as db:
        np.testing.assert_array_equal(db.logits([7, 8], model="cli-copy"),
                                      db.logits([7, 8], model="cli-model"))


def test_errors_are_reported_with_their_sqlstate(dsn, capsys):
    assert main(["--dsn", dsn, "generate", "hi", "--model", "no-such-model"]) == 1
    assert "[42704]" in capsys.readouterr().err
    env = dict(os.environ)
    env.pop("PG_GPT3_DSN", None)
    script = Path(sys.executable).parent / "pg-gpt3"
    done = subprocess.run([str(script), "generate", "hi"], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "no server" in done.stderr
