"""Small shared types: the chunk key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

_HEX = re.compile(r"[0-9a-f]{16,128}")
_SAFE_FMT = re.compile(r"[A-Za-z0-9_]{1,32}")


@dataclass(frozen=True, order=True)
class CacheEngineKey:
    """The name of one chunk of KV cache.

    ``chunk_hash`` is the hex digest of the chained prefix hash (see
    `ChunkedTokenDatabase`). The string form
    ``fmt@model_name@world_size@worker_id@chunk_hash`` is a single path component for
    any model name: the model name is percent-encoded, so it contains no ``/``, no
    ``@`` and cannot be ``.`` or ``..``. `from_string` parses it back exactly.
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
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise bad("world_size", "an int >= 1")
        if not (isinstance(self.worker_id, int) and 0 <= self.worker_id < self.world_size):
            raise bad("worker_id", "an int in [0, world_size)")
        if not isinstance(self.chunk_hash, str) or not _HEX.fullmatch(self.chunk_hash):
            raise bad("chunk_hash", "a lowercase hex digest of 16-128 digits")

    def to_string(self) -> str:
        model = quote(self.model_name, safe="").replace(".", "%2E")
        return f"{self.fmt}@{model}@{self.world_size}@{self.worker_id}@{self.chunk_hash}"

    def __str__(self) -> str:
        return self.to_string()

    @staticmethod
    def from_string(s: str) -> CacheEngineKey:
        parts = s.split("@")
        if len(parts) != 5:
            raise ValueError(
                f"not a chunk key: expected 'fmt@model@world_size@worker_id@hash', got {s!r}")
        fmt, model, world_size, worker_id, chunk_hash = parts
        if not (world_size.isdigit() and worker_id.isdigit()):
            raise ValueError(f"not a chunk key: world_size and worker_id must be integers in {s!r}")
        return CacheEngineKey(fmt, unquote(model), int(world_size), int(worker_id), chunk_hash)
