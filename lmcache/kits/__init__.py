"""Building blocks for components: what a storage backend, allocator, serde or token
database (lmcache's own or a third party's) may import besides the contracts.

* `memory` -- reference-counted memory objects and a free-list allocator over a tensor;
* `object_format`, `checksum` -- the self-describing stored object and its checksums;
* `fsspec_objects` -- whole objects in a directory of any fsspec file system;
* `remote` -- `RemoteBackend`: a remote tier over a transport (threads, timeouts,
  outages, serde, integrity);
* `tokens` -- the token and mask checks of the seed's API.

Kits import the contracts, `lmcache.plugin`, `lmcache.utils`, `lmcache.ops` and each
other; never the kernel, never a component.
"""
