"""The fsspec kit: whole objects by path in one directory of any fsspec file system.

Both tiers that store objects through fsspec -- the disk tier on a non-local URL and the
fsspec transport of the remote tier -- write, read and delete through `FsspecObjects`,
so that they agree on what "visible only once complete" means on each kind of store:

* **object stores** (``s3://``, ``gs://``, ``az://``, ...): a put is one object upload,
  atomic there; a rename would be a copy, so none is made;
* **file systems** (``file://``, ``memory://``, ``sftp://``, ...): the object is
  written under a temporary name ``.<random>.kvtmp`` in the same directory and renamed
  into place.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from lmcache.utils import Buffer

__all__ = ["OBJECT_STORE_PROTOCOLS", "OBJECT_SUFFIX", "TEMP_SUFFIX", "FsspecObjects"]

logger = logging.getLogger(__name__)

#: Suffix of a stored chunk object (the disk tier's files, objects in a store).
OBJECT_SUFFIX = ".kvobj"
#: Suffix of an object being written (file systems only); never visible as a chunk.
TEMP_SUFFIX = ".kvtmp"
#: fsspec protocols of object stores: a put is atomic, a rename is a copy.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "r2", "cos", "tos"}
)


class FsspecObjects:
    """Objects under ``root`` of the fsspec file system ``fs``.

    Every method takes a full path in ``fs`` (``root`` joined with a name). Errors of the
    file system propagate, except that a missing object is ``None`` (`get`) or ``False``
    (`exists`, `delete`).
    """

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        #: Whether a put is one atomic upload (an object store) rather than write + rename.
        self.atomic_put = bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))
        self._made_dirs = False

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
            self.fs.pipe_file(path, parts[0] if len(parts) == 1 else b"".join(parts))
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
                return self.fs.cat_file(path)
            return self.fs.cat_file(path, start=0, end=max_bytes + 1)
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        """Whether an object (a file, not a directory) is at ``path``."""
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return False
        return info.get("type") == "file"

    def delete(self, path: str) -> bool:
        """Delete the object at ``path``; returns whether it was there.

        An object store's DELETE of a missing object succeeds, so there the object is
        looked up first (found by the conformance kit against SeaweedFS).
        """
        if self.atomic_put and not self.exists(path):
            return False
        try:
            self.fs.rm_file(path)
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
