"""The cache server: `ChunkStore` served over the wire protocol (``lm://host:port``).

Operations (`lmcache.kits.wire.Op`; keys are ``<namespace>/<chunk key>``, see
`lmcache.server.store`):

``PUT``     the payload is received straight into memory of the CPU budget and becomes
            visible once complete: OK; NO_SPACE when the budget cannot hold it (the
            payload is read and dropped); BAD_REQUEST for a bad key or an empty value.
``GET``     the value when it is at most ``argument`` bytes long, sent from the memory
            it lives in; TOO_LARGE (argument: its length, nothing sent) when it is
            longer; NOT_FOUND.
``EXISTS``  OK or NOT_FOUND.   ``DELETE``  OK (it was there) or NOT_FOUND.
``STATS``   the counters as JSON (see `CacheServer.stats`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from lmcache.kits.wire import CACHE_SERVER, Limits, Op, Status
from lmcache.kits.wire_server import Frame, FrameServer
from lmcache.server.store import BadName, ChunkStore, parse_name

__all__ = ["SERVICE", "CacheServer"]

logger = logging.getLogger(__name__)

#: The cache server's name in HELLO replies; the ``lm`` tier checks it.
SERVICE = CACHE_SERVER


class CacheServer(FrameServer):
    """Serves a `ChunkStore` to many clients at once (a thread per connection; see
    `lmcache.kits.wire_server`) and logs its counters every ``stats_interval_s``."""

    service = SERVICE
    operations = frozenset({Op.PUT, Op.GET, Op.EXISTS, Op.DELETE, Op.STATS})

    def __init__(self, host: str, port: int, store: ChunkStore, *,
                 limits: Limits | None = None, stats_interval_s: float = 60.0,
                 **options: Any) -> None:
        super().__init__(host, port, limits=limits, **options)
        self.counters["bad_requests"] = 0
        self.store = store
        self.stats_interval_s = stats_interval_s
        self._stats_thread: threading.Thread | None = None

    def start(self) -> CacheServer:
        super().start()
        if self.stats_interval_s > 0:
            self._stats_thread = threading.Thread(target=self._log_stats_forever, daemon=True,
                                                  name="lmcache-server-stats")
            self._stats_thread.start()
        return self

    def stats(self) -> dict[str, Any]:
        """Counters: the store's (``chunks``, ``bytes``, ``capacity_bytes``, ``hits``,
        ``misses``, ``puts``, ``deletes``, ``evicted``, ``no_space``, ``disk_hits`` and,
        with a disk tier, ``disk_chunks``, ``disk_bytes``, ``disk_capacity_bytes``), the
        connections' (``clients`` now, ``connections`` in all, ``refused_busy``,
        ``requests``, ``bad_frames``, ``unknown_ops``, ``bad_requests``, ``timeouts``,
        ``server_errors``, ``bytes_in``, ``bytes_out``, ``errors``: the sum of the
        faults) and ``uptime_s``."""
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
            out["clients"] = len(self._clients)
        out["errors"] = (out["bad_frames"] + out["unknown_ops"] + out["bad_requests"]
                         + out["timeouts"] + out["server_errors"])
        out.update(self.store.stats())
        out["uptime_s"] = round(time.time() - self.started_at, 3)
        return out

    def stats_line(self) -> str:
        s = self.stats()
        disk = (f", disk {s['disk_chunks']} chunks {s['disk_bytes'] / 2**30:.2f} of "
                f"{s['disk_capacity_bytes'] / 2**30:.2f} GiB" if "disk_chunks" in s else "")
        return (f"{s['clients']} clients; {s['chunks']} chunks, {s['bytes'] / 2**30:.2f} of "
                f"{s['capacity_bytes'] / 2**30:.2f} GiB in memory{disk}; hits {s['hits']}, "
                f"misses {s['misses']}, puts {s['puts']}, evicted {s['evicted']}, "
                f"no space {s['no_space']}, errors {s['errors']}")

    def _log_stats_forever(self) -> None:
        while not self.wait(self.stats_interval_s):
            logger.info("lmcache server %s:%d: %s", *self.address, self.stats_line())

    # -- requests --------------------------------------------------------------------------

    def _bad_request(self, frame: Frame, message: str) -> None:
        self._count("bad_requests")
        frame.reply_message(Status.BAD_REQUEST, message)

    def handle(self, frame: Frame) -> None:
        op = frame.header.op
        if op == Op.STATS:
            frame.reply_json(self.stats())
            return
        try:
            key = parse_name(frame.key)
        except BadName as exc:
            self._bad_request(frame, str(exc))
            return
        if op == Op.PUT:
            if frame.payload_len == 0:
                self._bad_request(frame, "an empty value")
            elif self.store.put(key, frame.payload_len, frame.read_payload_into):
                frame.reply(Status.OK)
            else:
                frame.reply_message(Status.NO_SPACE, f"no room for {frame.payload_len} bytes "
                                    "in the server's memory budget")
        elif op == Op.GET:
            obj = self.store.get(key)
            if obj is None:
                frame.reply(Status.NOT_FOUND)
                return
            try:
                size = obj.get_size()
                if size > frame.header.arg:
                    frame.reply(Status.TOO_LARGE, arg=size)
                else:
                    frame.reply(Status.OK, [obj.byte_array])
            finally:
                obj.ref_count_down()
        elif op == Op.EXISTS:
            frame.reply(Status.OK if self.store.contains(key) else Status.NOT_FOUND)
        elif op == Op.DELETE:
            frame.reply(Status.OK if self.store.remove(key) else Status.NOT_FOUND)
