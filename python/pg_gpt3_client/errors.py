"""Exceptions raised by pg_gpt3_client.

Every error is a :class:`PgGpt3Error` carrying the server's ``sqlstate`` (``None`` for
failures on the client's side) and its ``kind``. Subclasses sort errors by what a caller does
about them, and also derive from the matching built-in exception where one exists, so
``except ValueError`` catches bad input and ``except TimeoutError`` a timeout.
"""
from __future__ import annotations

from typing import Optional


class PgGpt3Error(Exception):
    """A call failed. ``sqlstate`` is the server's five-character code, when it sent one."""

    def __init__(self, message: str, sqlstate: Optional[str] = None, kind: str = "Other"):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.kind = kind


class BadInputError(PgGpt3Error, ValueError):
    """Arguments the server refused: wrong sizes, NaN, negative counts, corrupt files,
    oversized requests (SQLSTATE classes 22, 23, 54)."""


class UnknownModelError(PgGpt3Error, LookupError):
    """No such model, tokenizer, dataset, checkpoint or large object (42704)."""


class PermissionDeniedError(PgGpt3Error, PermissionError):
    """The role lacks a privilege (42501)."""


class CancelledError(PgGpt3Error):
    """The query was cancelled (57014 by request)."""


class QueryTimeoutError(PgGpt3Error, TimeoutError):
    """The query ran past statement_timeout (57014 by timeout)."""


class ConflictError(PgGpt3Error):
    """What the call read changed under it, or a deadlock (class 40): run it again."""


class ResourcesError(PgGpt3Error):
    """Memory, disk, connections or another server resource ran out (class 53)."""


class ConnectionFailedError(PgGpt3Error, ConnectionError):
    """The connection could not be made or was lost."""


class ClientFileError(PgGpt3Error, OSError):
    """A file on this machine could not be read or written."""


__all__ = [
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
