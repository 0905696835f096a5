"""Prometheus metrics for lmcache, built only on its public hooks.

The hook implementations live in `lmcache_prometheus.hooks`, published under the
``lmcache.plugins`` entry-point group; the collectors in `lmcache_prometheus.metrics`.
"""

from lmcache_prometheus.metrics import METRICS, Metrics, server_address

__version__ = "0.1.0"

__all__ = ["METRICS", "Metrics", "server_address"]
