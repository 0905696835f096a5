"""lmcache's own components, laid out exactly like third-party plugins.

Each is registered as an entry point of the ``lmcache`` distribution and found through
the same registry as anyone's. They import the contracts (`lmcache.abc`), the kits
(`lmcache.kits`), `lmcache.plugin`, `lmcache.utils` and `lmcache.ops` -- never the kernel,
and never each other: ``allocators``, ``connectors``, ``token_databases``, ``serdes``,
``tiers.cpu``, ``tiers.disk`` and ``tiers.remote`` are separate components.
"""
