"""Remote tiers: a transport for another store, and the backend that builds it (tested)."""

import threading
from collections.abc import Sequence

import torch

from lmcache.abc.remote_transport import RemoteTransport
from lmcache.abc.storage_backend import TierContext
from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.memory_management import HostMemoryAllocator
from lmcache.kits.remote import RemoteBackend, RemoteOptions
from lmcache.utils import CacheEngineKey


# --8<-- [start:transport]
class DictTransport(RemoteTransport):
    """A "store" that is a dict shared by every transport with the same name."""

    stores: dict[str, dict[str, bytes]] = {}

    def __init__(self, url: str, timeout_s: float) -> None:
        self.description = url           # for log messages: never put credentials here
        self._data = self.stores.setdefault(url, {})
        self._lock = threading.Lock()    # calls come from several threads

    def object_name(self, key_string: str) -> str:
        return key_string

    def put(self, name: str, parts: Sequence[memoryview]) -> None:
        value = b"".join(bytes(p) for p in parts)
        with self._lock:                 # atomic: readers see all of it or nothing
            self._data[name] = value

    def get(self, name: str, max_bytes: int | None = None) -> bytes | None:
        value = self._data.get(name)
        if value is None or max_bytes is None:
            return value
        return value[: max_bytes + 1]    # a longer value comes back cut: too long

    def exists(self, name: str) -> bool:
        return name in self._data

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._data.pop(name, None) is not None


class DictStoreBackend(RemoteBackend):
    class Options(RemoteOptions):
        pass

    @classmethod
    def from_options(cls, options, config, metadata, context: TierContext):
        transport = DictTransport(options.url, options.timeout_s)
        return cls.from_transport(transport, options, config, metadata, context)
# --8<-- [end:transport]


config = LMCacheEngineConfig(chunk_size=16)
metadata = LMCacheEngineMetadata("m", 1, 0, "vllm", torch.float32, (1, 2, 16, 1, 4))
# --8<-- [start:build]
allocator = HostMemoryAllocator(1 << 20)
backend = DictStoreBackend.from_options(
    DictStoreBackend.Options(url="dict://docs"), config, metadata,
    TierContext(tier_name="dictstore", memory_allocator=allocator))
# --8<-- [end:build]
key = CacheEngineKey("vllm", "m", 1, 0, "ab" * 32)
obj = allocator.allocate((2, 1, 16, 4), torch.float32)
obj.tensor.copy_(torch.randn(2, 1, 16, 4))
backend.submit_put_task(key, obj).result()
back = backend.get_blocking(key)
assert back is not None and torch.equal(back.tensor, obj.tensor)
for o in (obj, back):
    o.ref_count_down()
backend.close()
assert allocator.num_active_allocations == 0
