"""pg_gpt3_client: Python client for pg_gpt3 (GPT-3 family models inside PostgreSQL).

This is the package's foundation: the tensor format shared with the server. The client
(`Client(dsn)` with generate / stream / train ...) arrives with the features it wraps.
"""
from ._native import __version__, decode_tensor, encode_tensor

DEFAULT_MODEL = "gpt3-125m"

__all__ = ["__version__", "DEFAULT_MODEL", "encode_tensor", "decode_tensor"]
