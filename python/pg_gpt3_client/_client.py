"""The Client: the native client's calls plus what is easier in Python (progress bars,
DataFrames, files or strings as datasets, the context manager)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Optional, Union

from . import _native
from ._native import DEFAULT_MODEL, StreamEvent, TrainStep

__all__ = ["Client", "PGLLMClient", "StreamEvent", "TrainStep"]


class Client(_native.Client):
    """A connection to a PostgreSQL database with the pg_llm extension.

    ``Client()`` connects to ``$PG_GPT3_DSN``; ``Client(dsn)`` to a libpq connection string
    or URL. Calls release the GIL while the server works, and Ctrl-C cancels the running
    query on the server (the call then raises KeyboardInterrupt). Use it as a context
    manager, or call :meth:`close`.

    >>> with Client() as db:                                   # doctest: +SKIP
    ...     print(db.generate("PostgreSQL is", max_tokens=16, temperature=0))
    """

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<pg_gpt3_client.Client {'closed' if self.closed else 'open'}>"

    def train(
        self,
        model: str = DEFAULT_MODEL,
        n_steps: int = 1,
        batch_size: int = 1,
        seq_len: Optional[int] = None,
        lr_max: float = 6e-4,
        warmup: int = 0,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        wd: float = 0.1,
        grad_clip: float = 1.0,
        dropout_p: float = 0.0,
        seed: int = 0,
        progress: bool = True,
    ):
        """Trains on the model's ``train`` rows (``llm_train``) and returns one record per
        step: a pandas DataFrame when pandas is installed, else a list of :class:`TrainStep`.

        With ``progress`` a tqdm bar (a widget in Jupyter) shows loss and tokens/s as each
        step ends. Ctrl-C stops the run on the server and changes nothing, since weights are
        written once, after the last step.
        """
        steps = self.train_stream(
            model=model, n_steps=n_steps, batch_size=batch_size, seq_len=seq_len,
            lr_max=lr_max, warmup=warmup, beta1=beta1, beta2=beta2, eps=eps, wd=wd,
            grad_clip=grad_clip, dropout_p=dropout_p, seed=seed,
        )
        records: List[TrainStep] = []
        bar = _progress_bar(n_steps, f"training {model}") if progress else None
        try:
            for step in steps:
                records.append(step)
                if bar is not None:
                    bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{step.tokens_per_s:.0f}")
                    bar.update(1)
        finally:
            steps.close()
            if bar is not None:
                bar.close()
        return _as_frame(records)

    def prepare_dataset(
        self,
        sources: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]],
        model: str = DEFAULT_MODEL,
        block_size: int = 2048,
        stride: Optional[int] = None,
        split: str = "train",
    ) -> int:
        """Adds training rows from texts or text files, tokenized on the server with the
        model's tokenizer (``llm_dataset_from_text``): blocks of ``block_size`` tokens,
        starting every ``stride`` tokens (default: no overlap). A path (``pathlib.Path`` or any
        ``os.PathLike``) is a UTF-8 text file to read here; a ``str`` is the text itself.
        Returns the rows added."""
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        rows = 0
        for source in sources:
            rows += self.dataset_from_text(
                _text_of(source), model=model, block_size=block_size, stride=stride, split=split
            )
        return rows


#: The name of pg_gpt2's client class, kept for old code.
PGLLMClient = Client


def _text_of(source: Union[str, os.PathLike]) -> str:
    if isinstance(source, os.PathLike):
        return Path(source).read_text(encoding="utf-8")
    return source


def _progress_bar(total: int, description: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a stripped environment still trains
        return None
    return tqdm(total=total, desc=description, unit="step")


def _as_frame(records: List[TrainStep]):
    try:
        import pandas as pd
    except ImportError:
        return records
    return pd.DataFrame([r.to_dict() for r in records])
