"""``python -m lmcache.server HOST PORT [DEVICE] [options]``: the cache server."""

import sys

from lmcache.server.main import main

if __name__ == "__main__":
    sys.exit(main())
