"""``python -m lmcache.experimental.server HOST PORT [DEVICE]``: the seed's command for the
cache server (`lmcache.server`), which engines reach with ``remote_url: lm://HOST:PORT``."""

import sys

from lmcache.server.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main(prog="python -m lmcache.experimental.server"))
