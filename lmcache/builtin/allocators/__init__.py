"""lmcache's allocators (group ``lmcache.allocators``).

* ``host``, ``pinned``, ``gpu`` (`region`) -- one region of pageable host, page-locked
  host or GPU memory, handed out by the free list of `lmcache.kits.memory`;
* ``mixed`` (`mixed`) -- page-locked memory for tensors, Python byte buffers for format
  ``BINARY_BUFFER``.
"""
