"""Small things everything may import: the chunk key, the byte-buffer type, log-once,
observer calls, releasing an abandoned load."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

#: What a serde produces and a transport moves: any contiguous buffer of bytes.
Buffer = bytes | bytearray | memoryview

_SAFE_FMT = re.compile(r"[A-Za-z0-9_]{1,32}")
_WORLD_SIZE = re.compile(r"0|[1-9][0-9]{0,8}")
_WORKER_ID = re.compile(r"-?(0|[1-9][0-9]{0,8})")
#: Integers of a key's string form have at most 9 digits.
_INT_LIMIT = 10**9
#: Longest percent-encoded model name in a key: with the other fields and a 128-digit
#: hash, the string form stays well under the 255-byte file-name limit of common file
#: systems. A longer name (a model served from a deep local path) is shortened.
MAX_MODEL_CHARS = 96
#: Of a shortened model name, the encoded characters kept from its end.
_KEPT_TAIL_CHARS = 48
#: Longest percent-encoded chunk hash in a key; a longer one is replaced by ``~`` and
#: the hex sha256 of it.
MAX_HASH_CHARS = 128


@dataclass(frozen=True, order=True)
class CacheEngineKey:
    """The name of one chunk of KV cache.

    ``chunk_hash`` names the chunk's prefix: for `ChunkedTokenDatabase` the hex digest
    of the chained prefix hash. Any non-empty string is accepted (a third-party token
    database's own hashes), and so is an int, which the key holds as its hex digits
    (``255`` and ``"ff"`` are one key: one key, one string form). ``worker_id`` is any
    int of at most 9 digits, as in the seed (which allowed ``-1`` and ids beyond
    ``world_size``); ``world_size`` is at least 1.

    The string form ``fmt@model_name@world_size@worker_id@chunk_hash`` is a single path
    component whatever the fields hold: the model name and the chunk hash are
    percent-encoded, so it contains no ``/``, no ``@`` and cannot be ``.`` or ``..``.
    `from_string` parses it back exactly and accepts nothing but that canonical form.

    A model name longer than `MAX_MODEL_CHARS` once encoded (a Hugging Face snapshot
    path, say) is stored in the key shortened to its last characters, ``~`` and 32 hex
    digits of its sha256; a chunk hash longer than `MAX_HASH_CHARS` once encoded
    becomes ``~`` and its sha256. Keys stay file names, the same fields always give the
    same key, and two different ones never share one.
    """

    fmt: str
    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: str

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(
                f"CacheEngineKey.{field} must be {expected}, got {getattr(self, field)!r}")

        if not isinstance(self.fmt, str) or not _SAFE_FMT.fullmatch(self.fmt):
            raise bad("fmt", "1-32 characters of [A-Za-z0-9_]")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise bad("model_name", "a non-empty string")
        try:
            encoded = _encode(self.model_name)
        except UnicodeEncodeError:
            raise bad("model_name", "valid Unicode text") from None
        if len(encoded) > MAX_MODEL_CHARS:
            object.__setattr__(self, "model_name", _shorten_model(self.model_name))
        if not (_is_int(self.world_size) and 1 <= self.world_size < _INT_LIMIT):
            raise bad("world_size", "an int >= 1 of at most 9 digits")
        if not (_is_int(self.worker_id) and -_INT_LIMIT < self.worker_id < _INT_LIMIT):
            raise bad("worker_id", "an int of at most 9 digits")
        chunk_hash = self.chunk_hash
        if _is_int(chunk_hash):
            chunk_hash = format(chunk_hash, "x")
        elif not isinstance(chunk_hash, str) or not chunk_hash:
            raise bad("chunk_hash", "a non-empty string or an int")
        try:
            encoded = _encode(chunk_hash)
        except UnicodeEncodeError:
            raise bad("chunk_hash", "valid Unicode text") from None
        if len(encoded) > MAX_HASH_CHARS:
            chunk_hash = "~" + hashlib.sha256(chunk_hash.encode("utf-8")).hexdigest()
        if chunk_hash is not self.chunk_hash:
            object.__setattr__(self, "chunk_hash", chunk_hash)

    def to_string(self) -> str:
        return (f"{self.fmt}@{_encode(self.model_name)}@{self.world_size}@{self.worker_id}"
                f"@{_encode(self.chunk_hash)}")

    def __str__(self) -> str:
        return self.to_string()

    @staticmethod
    def from_string(s: str) -> CacheEngineKey:
        parts = s.split("@")
        if len(parts) != 5:
            raise ValueError(
                f"not a chunk key: expected 'fmt@model@world_size@worker_id@hash', got {s!r}")
        fmt, model, world_size, worker_id, chunk_hash = parts
        if not (_WORLD_SIZE.fullmatch(world_size) and _WORKER_ID.fullmatch(worker_id)):
            raise ValueError(f"not a chunk key: world_size and worker_id must be integers in {s!r}")
        key = CacheEngineKey(fmt, unquote(model, errors="strict"), int(world_size),
                             int(worker_id), unquote(chunk_hash, errors="strict"))
        if key.to_string() != s:  # one key, one spelling: no aliases such as %2e or 01
            raise ValueError(f"not a chunk key in canonical form: {s!r}")
        return key


def _shorten_model(model_name: str) -> str:
    digest = hashlib.sha256(model_name.encode("utf-8")).hexdigest()[:32]
    tail = ""
    for ch in reversed(model_name):
        if len(_encode(ch + tail)) > _KEPT_TAIL_CHARS:
            break
        tail = ch + tail
    return f"{tail}~{digest}"


def _encode(text: str) -> str:
    # "." is encoded too, so that no field is "." or ".." (nor hides a file extension)
    return quote(text, safe="", errors="strict").replace(".", "%2E")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LogOnce:
    """Log the first event of each kind as a warning and later ones at DEBUG level.

    For faults that repeat per chunk (a store that is down, a disk that is full): the
    operator sees one warning per kind and component, not one per chunk.
    """

    def __init__(self, logger: logging.Logger, prefix: str = "") -> None:
        self.logger = logger
        self.prefix = prefix.replace("%", "%%")  # logged as part of a format string
        self._seen: set[Any] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: Any, message: str, *args: Any) -> bool:
        """Log ``message % args`` for an event of ``kind``; returns whether it was the first."""
        with self._lock:
            first = kind not in self._seen
            self._seen.add(kind)
        if first:
            self.logger.warning(self.prefix + message + " (further events of this kind are "
                                "logged at DEBUG level)", *args)
        else:
            self.logger.debug(self.prefix + message, *args)
        return first


def call_observer(logger: logging.Logger, callback: Callable[..., Any] | None,
                  *args: Any) -> None:
    """``callback(*args)``, if there is one, with its exceptions logged and swallowed.

    Observers end in plugin hooks; one that raises must not turn a write or a miss into
    an exception on the serving path.
    """
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        logger.exception("observer %r raised", callback)


def release_late_result(future: Future) -> None:
    """A done-callback for a load whose caller stopped waiting: frees the memory object it
    produced, if any, since nobody else will take it."""
    try:
        obj = future.result()
    except Exception:
        return
    if obj is not None:
        obj.ref_count_down()
