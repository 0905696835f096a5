"""lmcache's network services, on the top floor (they may import anything).

* the cache server (`lmcache.server.cache_server`): engines share chunks through it with
  ``remote_url: lm://host:port``; it keeps them in lmcache's own tiers
  (`lmcache.server.store`);
* it serves the wire protocol (`lmcache.kits.wire`) with the threaded server of
  `lmcache.kits.wire_server`, which the peer-to-peer tier uses for its chunk service too.

Start the cache server with ``python -m lmcache.server HOST PORT`` (also
``python -m lmcache.experimental.server``, ``python -m lmcache.v1.server`` and
``lmcache server``); `main` is that command.
"""

from lmcache.server.main import main

__all__ = ["main"]
