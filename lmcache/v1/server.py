"""``python -m lmcache.v1.server HOST PORT [DEVICE]``: LMCache v1's command for the cache
server (`lmcache.server`), which engines reach with ``remote_url: lm://HOST:PORT``."""

import sys

from lmcache.server.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main(prog="python -m lmcache.v1.server"))
