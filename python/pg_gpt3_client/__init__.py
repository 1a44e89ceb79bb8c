"""pg_gpt3_client: GPT-3 family language models inside PostgreSQL, from Python.

>>> from pg_gpt3_client import Client                                    # doctest: +SKIP
>>> db = Client("host=localhost user=postgres dbname=llm")               # or $PG_GPT3_DSN
>>> db.generate("PostgreSQL is", max_tokens=16, temperature=0)
>>> for event in db.stream("Once upon a time", max_tokens=32):
...     print(event.token, end="", flush=True)
>>> db.logits([464, 3290], model="gpt3-125m").shape                      # NumPy float32
>>> db.train(model="gpt3-125m", n_steps=100, batch_size=8, seq_len=128)  # tqdm bar, DataFrame

The calls are the pg_llm SQL functions (keyword arguments carry their argument names, with
``model`` for ``model_name``), run by the Rust client ``pg_gpt3_client`` underneath.
"""
from ._native import DEFAULT_MODEL, __version__, decode_tensor, encode_tensor
from ._client import Client, PGLLMClient, StreamEvent, TrainStep
from ._async import AsyncClient
from .errors import (
    BadInputError,
    CancelledError,
    ClientFileError,
    ConflictError,
    ConnectionFailedError,
    PermissionDeniedError,
    PgGpt3Error,
    QueryTimeoutError,
    ResourcesError,
    UnknownModelError,
)

__all__ = [
    "__version__",
    "DEFAULT_MODEL",
    "Client",
    "AsyncClient",
    "PGLLMClient",
    "StreamEvent",
    "TrainStep",
    "encode_tensor",
    "decode_tensor",
    "PgGpt3Error",
    "BadInputError",
    "UnknownModelError",
    "PermissionDeniedError",
    "CancelledError",
    "QueryTimeoutError",
    "ConflictError",
    "ResourcesError",
    "ConnectionFailedError",
    "ClientFileError",
]
