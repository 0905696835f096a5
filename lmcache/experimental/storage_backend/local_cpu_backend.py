"""The seed's ``local_cpu_backend``: see `lmcache.builtin.tiers.cpu`."""

from lmcache.builtin.tiers.cpu import LocalCPUBackend

__all__ = ["LocalCPUBackend"]
