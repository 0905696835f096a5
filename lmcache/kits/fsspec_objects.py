"""The fsspec kit: whole objects by path in one directory of any fsspec file system.

Both tiers that store objects through fsspec -- the disk tier on a non-local URL and the
fsspec transport of the remote tier -- write, read and delete through `FsspecObjects`,
so that they agree on what "visible only once complete" means on each kind of store:

* **object stores** (``s3://``, ``gs://``, ``az://``, ...): a put is one object upload,
  atomic there; a rename would be a copy, so none is made;
* **file systems** (``file://``, ``memory://``, ``sftp://``, ...): the object is
  written under a temporary name ``.<random>.kvtmp`` in the same directory and renamed
  into place.

With ``timeout_s``, the calls to an asynchronous file system (s3fs, gcsfs, adlfs, ...)
that put an object in one upload, get, look up or delete one are cancelled after that
long (fsspec's ``sync(..., timeout=)``: the request is aborted, its connection closed
and its buffers released) and raise `TimeoutError`. `url_syntax_problem` says what in a
URL fsspec or an object store's implementation would read as syntax rather than as a
part of the path.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from lmcache.utils import Buffer

__all__ = ["OBJECT_STORE_PROTOCOLS", "OBJECT_SUFFIX", "TEMP_SUFFIX", "FsspecObjects",
           "url_syntax_problem"]

logger = logging.getLogger(__name__)

#: Suffix of a stored chunk object (the disk tier's files, objects in a store).
OBJECT_SUFFIX = ".kvobj"
#: Suffix of an object being written (file systems only); never visible as a chunk.
TEMP_SUFFIX = ".kvtmp"
#: fsspec protocols of object stores: a put is atomic, a rename is a copy.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "r2", "cos", "tos"}
)


def url_syntax_problem(url: str) -> str | None:
    """What in ``url`` would not be read as a plain path, or ``None`` if nothing.

    ``::`` chains fsspec URLs (``simplecache::s3://...``): every call of such a
    "file system" fails. In an object store's URL, ``?`` and ``#`` are not part of the
    key: s3fs reads ``?versionId=`` as an object version (every chunk would be the same
    object), and other stores have their own query and fragment syntax.
    """
    if "::" in url:
        return "'::' (fsspec URL chaining) is not supported"
    protocol, sep, path = url.partition("://")
    if sep and protocol.lower() in OBJECT_STORE_PROTOCOLS:
        for char in ("?", "#"):
            if char in path:
                return (f"{char!r} in an object store's path is read as syntax, not as a "
                        "part of the key")
    return None


class FsspecObjects:
    """Objects under ``root`` of the fsspec file system ``fs``.

    Every method takes a full path in ``fs`` (``root`` joined with a name). Errors of the
    file system propagate, except that a missing object is ``None`` (`get`) or ``False``
    (`exists`, `delete`). With ``timeout_s``, `put` (on an object store), `get`,
    `exists` and `delete` of an asynchronous file system end within about that long
    (`TimeoutError` otherwise).
    """

    def __init__(self, fs: Any, root: str, timeout_s: float | None = None) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        #: Whether a put is one atomic upload (an object store) rather than write + rename.
        self.atomic_put = bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))
        #: The longest one method takes on an asynchronous file system (None: unbounded).
        self.timeout_s = timeout_s if timeout_s and getattr(fs, "async_impl", False) else None
        self._made_dirs = False

    def _run(self, method: str, *args: Any, deadline: float | None = None,
             **kwargs: Any) -> Any:
        """``fs.<method>(*args, **kwargs)``, cancelled at ``deadline`` (or after
        ``timeout_s``) on an asynchronous file system."""
        if self.timeout_s is not None:
            coroutine = getattr(self.fs, f"_{method}", None)
            if inspect.iscoroutinefunction(coroutine):
                from fsspec.asyn import sync

                timeout = (self.timeout_s if deadline is None else
                           max(deadline - time.monotonic(), 0.001))
                try:
                    return sync(self.fs.loop, coroutine, *args, timeout=timeout, **kwargs)
                except TimeoutError as exc:  # fsspec's FSTimeoutError has no message
                    raise TimeoutError(f"{method} {args[0] if args else ''} took longer "
                                       f"than {timeout:.3g} s; cancelled") from exc
        return getattr(self.fs, method)(*args, **kwargs)

    def path(self, name: str) -> str:
        """The full path of ``name`` under the root."""
        return f"{self.root}/{name}"

    def makedirs(self) -> None:
        """Create the root directory (file systems; object stores have none)."""
        if not self.atomic_put and not self._made_dirs:
            self.fs.makedirs(self.root, exist_ok=True)
        self._made_dirs = True

    def put(self, path: str, parts: Sequence[Buffer]) -> None:
        """Store the concatenation of ``parts`` at ``path`` so that it appears complete
        or not at all."""
        if self.atomic_put:
            self._run("pipe_file", path, parts[0] if len(parts) == 1 else b"".join(parts))
            return
        self.makedirs()
        tmp = self.path(f".{uuid.uuid4().hex}{TEMP_SUFFIX}")
        try:
            with self.fs.open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
            self.fs.mv(tmp, path)
        except BaseException:
            self.delete_quietly(tmp)
            raise

    def get(self, path: str, max_bytes: int | None = None) -> bytes | None:
        """The object at ``path`` (at most its first ``max_bytes + 1`` bytes), or ``None``
        if there is none."""
        try:
            if max_bytes is None:
                return self._run("cat_file", path)
            return self._run("cat_file", path, start=0, end=max_bytes + 1)
        except FileNotFoundError:
            return None

    def exists(self, path: str, deadline: float | None = None) -> bool:
        """Whether an object (a file, not a directory) is at ``path``."""
        try:
            info = self._run("info", path, deadline=deadline)
        except FileNotFoundError:
            return False
        return info.get("type") == "file"

    def delete(self, path: str) -> bool:
        """Delete the object at ``path``; returns whether it was there.

        An object store's DELETE of a missing object succeeds, so there the object is
        looked up first (found by the conformance kit against SeaweedFS).
        """
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        if self.atomic_put and not self.exists(path, deadline):
            return False
        try:
            self._run("rm_file", path, deadline=deadline)
        except FileNotFoundError:
            return False
        return True

    def delete_quietly(self, path: str) -> None:
        """Best-effort delete: a file that cannot be deleted is at worst a leftover."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            logger.debug("could not delete %s: %s", path, exc)

    def listing(self) -> list[dict[str, Any]]:
        """The entries directly under the root (fsspec ``ls`` details); empty if the root
        does not exist."""
        try:
            return self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
