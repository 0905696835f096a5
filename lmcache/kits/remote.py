"""The remote kit: one `RemoteBackend` for every store reached over a network.

A remote tier is a `RemoteBackend` over a `RemoteTransport`. The transport is the small,
store-specific part — put, get, exists and delete of bytes by name — and the backend
does the hard parts once, for every store:

Values
    A chunk is stored as the bytes its `Serde` makes (``remote_serde``): the
    self-describing object of `object_format` (header with checksum and the key it was
    stored under, then the payload, compressed or not). A get reads no more than the
    serde can make of this engine's largest chunk (``TierContext.chunk_spec``). A value
    that is missing, corrupt, partial, foreign, too long, stored under another key or
    not this engine's kind of chunk decodes to ``None`` and is a miss; the backend then
    ignores that key (a bounded set of `BAD_KEYS` of them) until this process writes it
    again, instead of fetching it on every lookup. Bad values are not deleted: in a
    shared store they may be another program's.
Names
    The chunk key's string form (`CacheEngineKey.to_string`) under a namespace: the
    transport decides the spelling (``lmcache:<key>`` in Redis,
    ``<url>/lmcache/<key>.kvobj`` in an object store).
Asynchronous puts
    `RemoteBackend.submit_put_task` returns at once; writer threads serialize and send.
    At most ``max_pending_puts`` writes wait at a time; beyond that, and while the store
    is unavailable, puts are *dropped*: counted in `RemoteBackend.stats`, logged once,
    never an exception to the caller; each drop goes to the ``lmcache_puts_dropped``
    hook. A write that fails carries its exception in its future, which the storage
    manager reports to the ``lmcache_storage_error`` hook.
Bounded waits
    Every call ends within `RemoteBackend.bound_s` = ``timeout_s`` + `BOUND_SLACK_S`
    (0.5 s), whatever the store does (refuses connections, freezes, restarts, answers
    slowly): `contains`, `get_blocking` and `remove` run the remote call on an I/O
    thread and stop waiting after ``timeout_s``; the future of `submit_prefetch_task`
    is resolved (with ``None``) ``timeout_s`` after the call at the latest, by a deadline
    watcher; `submit_put_task` returns at once, and its future fails (the put counted
    as dropped) ``timeout_s`` after its write started, if the write has not ended;
    `close` waits at most ``timeout_s`` for pending writes, then gives up on them
    (dropped). A result that arrives after its caller gave up is released. An
    abandoned call keeps its thread until the transport returns; another thread takes
    its place (at most ``num_workers`` such spares per pool), and every thread is a
    daemon, so that a hung call never blocks later calls or the exit of the process.
    A write keeps its chunk's memory until its transport call returns (the transport
    may still be reading it): transports bound their own calls (socket, connect and
    read timeouts of ``timeout_s``; the fsspec transport cancels a call after
    ``timeout_s``), and writes still queued when the store fails are dropped at once.
Outages
    A failed or timed-out call marks the store *unavailable* for a back-off interval
    (``retry_interval_s``, doubling on every consecutive failure up to
    ``max_retry_interval_s``): meanwhile lookups and gets are misses at once and puts
    are dropped, so a dead store does not cost a timeout per chunk. At the end of the
    interval a probe (one bounded ``exists`` of a name no chunk has) asks the store on a
    thread of the tier's own, so that no caller -- a scheduler's lookup, a step's store
    -- ever waits for a store that is down; when the probe succeeds the tier is back,
    with fresh connections (the transport reconnects by itself), and when it fails the
    next interval begins. With ``retry_interval_s: 0`` there is no back-off and no
    probe: every call tries the store. The keys known to be stored are
    forgotten at every outage, since the store may have restarted empty. A failed
    lookup, read or delete goes to the ``lmcache_storage_error`` hook, and the start
    and end of an outage to ``lmcache_tier_availability_changed``.
Lookups
    `contains` asks the store (one bounded round trip) unless the key is in a bounded
    local set of keys known to be stored (written or found by this process). A key that
    a store evicted on its own may stay in that set: a lookup then over-counts and the
    retrieve that follows loads what is really there (see ``retrieve``'s mask).

A store-specific remote tier is a `RemoteTransport` (`lmcache.abc.remote_transport`)
and a ``from_options`` that builds it; `RemoteBackend.from_transport` does the rest::

    class AcmeBackend(RemoteBackend):
        class Options(RemoteOptions):
            region: str = "eu"

        @classmethod
        def from_options(cls, options, config, metadata, context):
            transport = AcmeTransport(options.url, options.region, options.timeout_s)
            return cls.from_transport(transport, options, config, metadata, context)

A distribution that serves a URL scheme in ``remote_url`` claims it in the
``lmcache.url_schemes`` entry-point group (see `lmcache.plugin.registry`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field

from lmcache.abc.remote_transport import RemoteTransport, RemoteUnavailable
from lmcache.abc.storage_backend import StorageBackendInterface, TierContext
from lmcache.kits.threads import DaemonPool, Deadlines
from lmcache.plugin.options import PluginOptions
from lmcache.plugin.registry import registry
from lmcache.utils import CacheEngineKey, LogOnce, call_observer, release_late_result

if TYPE_CHECKING:
    from lmcache.abc.memory import MemoryAllocatorInterface, MemoryObj
    from lmcache.abc.serde import Serde
    from lmcache.abc.storage_backend import ChunkSpec

__all__ = [
    "BAD_KEYS",
    "BOUND_SLACK_S",
    "RemoteBackend",
    "RemoteOptions",
    "RemoteStats",
    "redact_url",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a key whose value could not be decoded is treated as absent.
BAD_KEYS = 65536
#: What every call may take beyond ``timeout_s`` (`RemoteBackend.bound_s`): thread
#: hand-offs, the deadline watcher, observers, closing the transport.
BOUND_SLACK_S = 0.5
#: The longest `RemoteBackend.close` waits for the transport's own ``close``.
_CLOSE_TRANSPORT_S = 0.25


#: What the probe of an outage asks the store for: a key in chunk-key form (stores that
#: check the form accept it) whose format no engine writes.
PROBE_NAME = CacheEngineKey("lmcache_probe", "lmcache", 1, 0, "0" * 64).to_string()


def redact_url(url: str) -> str:
    """``url`` without its password, for log messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


# ---------------------------------------------------------------------------------------
# Counters and options
# ---------------------------------------------------------------------------------------


@dataclass
class RemoteStats:
    """Counters of one remote tier (read them with `RemoteBackend.stats`)."""

    puts: int = 0  #: values written
    dropped_puts: int = 0  #: puts not written: store unavailable, queue full or failed
    hits: int = 0  #: gets that returned a chunk
    misses: int = 0  #: gets of names the store does not hold
    bad_values: int = 0  #: values that could not be decoded (corrupt, partial, foreign)
    failures: int = 0  #: calls that failed or timed out
    timeouts: int = 0  #: calls abandoned after ``timeout_s``
    outages: int = 0  #: times the store became unavailable


class RemoteOptions(PluginOptions):
    """Options every remote tier understands (the ``remote`` tier and ``redis``)."""

    url: str = Field(description="URL of the store: `redis://[user:password@]host:port/db`, "
                     "`rediss://...` (TLS), `redis+cluster://host:port[,host:port...]`, "
                     "`s3://bucket/prefix` or any fsspec URL, or `lm://host:port` "
                     "(lmcache's cache server).")
    serde: str = Field(default="naive", description="Serde of the values "
                       "(`lmcache.serdes`): `naive` or `zstd`.")
    serde_options: dict[str, Any] = Field(default_factory=dict,
                                          description="Options of the serde.")
    timeout_s: float = Field(default=10.0, gt=0, description="Longest wait for one remote "
                             "call; a slower store is a miss (lookups, gets) or a dropped "
                             "put. The flat field `blocking_timeout_secs`.")
    retry_interval_s: float = Field(default=1.0, ge=0, description="After a failure the "
                                    "store is left alone this long (doubling on every "
                                    "consecutive failure) before it is tried again.")
    max_retry_interval_s: float = Field(default=30.0, ge=0, description="Upper bound of the "
                                        "back-off between tries of an unavailable store.")
    namespace: str = Field(default="lmcache", pattern=r"^[A-Za-z0-9_.-]{0,64}$",
                           description="Prefix of every name in the store; engines that "
                           "share a namespace (and a model) share chunks.")
    num_workers: int = Field(default=4, ge=1, description="Threads for writes, and as many "
                             "for lookups and reads.")
    max_pending_puts: int = Field(default=64, ge=1, description="Writes that may wait at "
                                  "once; further puts are dropped (counted) until they "
                                  "drain, so a slow store never holds much memory.")
    known_keys: int = Field(default=65536, ge=0, description="Keys known to be stored that "
                            "are remembered locally, so a lookup needs no round trip.")


class _Attempt:
    """One remote call that a caller may give up on (``abandoned``): its late outcome is
    then not counted (no failure, no success, no hit) and a late object is released."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


class _Write(_Attempt):
    """A put from `RemoteBackend.submit_put_task` until its future is settled."""

    __slots__ = ("key", "obj", "future", "task", "deadline")

    def __init__(self, key: CacheEngineKey, obj: MemoryObj) -> None:
        super().__init__()
        self.key = key
        self.obj = obj
        self.future: Future = Future()  # what the caller gets
        self.future.set_running_or_notify_cancel()
        self.task: Future | None = None  # the write on a writer thread
        self.deadline: list[Any] | None = None  # its `Deadlines` entry, once started


def _settle(future: Future, result: Any = None, exc: BaseException | None = None) -> bool:
    """Resolve ``future`` unless it is resolved already; returns whether this did."""
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except InvalidStateError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# The backend: threads, bounds, outages, serde
# ---------------------------------------------------------------------------------------


class RemoteBackend(StorageBackendInterface):
    """A storage tier in a remote store, over a `RemoteTransport` and a `Serde`.

    See the module documentation for the behaviour; in short: asynchronous puts, every
    call bounded by `bound_s`, an unavailable store is a miss (and puts are dropped)
    without exceptions, back-off and automatic reconnection, self-describing values.

    Subclasses for one kind of store build a transport and call this constructor; a
    store that needs nothing else can use this class directly.
    """

    def __init__(
        self,
        transport: RemoteTransport,
        serde: Serde,
        memory_allocator: MemoryAllocatorInterface,
        *,
        timeout_s: float = 10.0,
        retry_interval_s: float = 1.0,
        max_retry_interval_s: float = 30.0,
        num_workers: int = 4,
        max_pending_puts: int = 64,
        known_keys: int = 65536,
        tier_name: str = "remote",
        on_error: Callable[[str, BaseException], None] | None = None,
        on_dropped: Callable[[list[CacheEngineKey], int, str], None] | None = None,
        on_availability: Callable[[bool, BaseException | None], None] | None = None,
        chunk_spec: ChunkSpec | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if num_workers < 1 or max_pending_puts < 1 or known_keys < 0:
            raise ValueError("num_workers and max_pending_puts must be >= 1 and known_keys "
                             f">= 0, got {num_workers}, {max_pending_puts}, {known_keys}")
        self.transport = transport
        self.serde = serde
        self.memory_allocator = memory_allocator
        self.chunk_spec = chunk_spec
        #: The most bytes one get reads: what the serde makes of the largest chunk.
        self.max_value_bytes = (None if chunk_spec is None else
                                serde.max_value_size(chunk_spec.max_payload_bytes))
        self.timeout_s = float(timeout_s)
        self.retry_interval_s = float(retry_interval_s)
        self.max_retry_interval_s = max(float(max_retry_interval_s), self.retry_interval_s)
        self.max_pending_puts = max_pending_puts
        self.tier_name = tier_name
        self.on_error = on_error
        self.on_dropped = on_dropped
        self.on_availability = on_availability

        self._lock = threading.Lock()
        self._stats = RemoteStats()
        self._put_tasks: dict[CacheEngineKey, _Write] = {}
        self._known: OrderedDict[CacheEngineKey, None] = OrderedDict()
        self._known_max = known_keys
        self._bad: OrderedDict[CacheEngineKey, None] = OrderedDict()  # oldest first
        self._down_until = 0.0
        self._backoff = self.retry_interval_s
        self._consecutive_failures = 0
        self._probing = False
        self._stop_probing = threading.Event()
        self._log_once = LogOnce(logger, f"{tier_name} ({transport.description}): ")
        self._closed = False
        self._writers = DaemonPool(num_workers, num_workers, f"{tier_name}-w")
        self._io = DaemonPool(num_workers, num_workers, f"{tier_name}-io")
        self._deadlines = Deadlines(f"{tier_name}-deadlines")

    @classmethod
    def from_transport(cls, transport: RemoteTransport, options: RemoteOptions, config: Any,
                       metadata: Any, context: TierContext) -> RemoteBackend:
        """The tier over ``transport`` with the common ``options``: the serde they name
        (from the registry), the allocator and observers of ``context``. What a
        store-specific ``from_options`` calls once it has built its transport."""
        serde = registry.create("serde", options.serde, options.serde_options, config,
                                metadata)
        events = context.events
        return cls(transport, serde, context.allocator_for(cls),
                   timeout_s=options.timeout_s, retry_interval_s=options.retry_interval_s,
                   max_retry_interval_s=options.max_retry_interval_s,
                   num_workers=options.num_workers, max_pending_puts=options.max_pending_puts,
                   known_keys=options.known_keys, tier_name=context.tier_name or "remote",
                   on_error=events.error, on_dropped=events.dropped,
                   on_availability=events.availability, chunk_spec=context.chunk_spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tier_name!r}, {self.transport.description!r})"

    @property
    def bound_s(self) -> float:
        """The longest any call of this tier takes, or any of its futures stays pending
        once its remote call started: ``timeout_s`` + `BOUND_SLACK_S`."""
        return self.timeout_s + BOUND_SLACK_S

    @property
    def stats(self) -> RemoteStats:
        """A snapshot of the tier's counters."""
        with self._lock:
            return RemoteStats(**{f.name: getattr(self._stats, f.name)
                                  for f in fields(RemoteStats)})

    @property
    def available(self) -> bool:
        """Whether the store is tried now: False from a failure until a probe succeeds
        (with ``retry_interval_s: 0``, until the next call)."""
        if self.retry_interval_s > 0 and self._consecutive_failures:
            return False
        return time.monotonic() >= self._down_until

    def _probe_until_back(self) -> None:
        """The probe thread of an outage: at the end of each back-off interval, one
        bounded call to the store; ends when it answers or the tier is closed."""
        probe_name = self.transport.object_name(PROBE_NAME)
        while True:
            with self._lock:
                if self._closed or not self._consecutive_failures:
                    self._probing = False
                    return
                wait = self._down_until - time.monotonic()
            if wait > 0:
                self._stop_probing.wait(wait)
                continue
            try:
                future = self._io.submit(self.transport.exists, probe_name)
            except RuntimeError:  # the pool is closed: so is the tier
                with self._lock:
                    self._probing = False
                return
            try:
                future.result(timeout=self.timeout_s)
            except FutureTimeout:
                self._io.abandon(future)
                logger.debug("%s: probe: no answer within %g s", self.tier_name,
                             self.timeout_s)
                self._failed("probe", TimeoutError(f"no answer within {self.timeout_s:g} s"))
            except CancelledError:  # the tier was closed meanwhile
                continue
            except Exception as exc:
                logger.debug("%s: probe failed: %s: %s", self.tier_name,
                             type(exc).__name__, exc)
                self._failed("probe", exc)
            else:
                self._succeeded()

    # -- outages -------------------------------------------------------------------------

    def _count(self, counter: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + n)

    def _failed(self, operation: str, exc: BaseException) -> None:
        """A call failed or timed out: the store is unavailable for a back-off interval,
        and the writes that have not started yet are dropped."""
        now = time.monotonic()
        with self._lock:
            self._stats.failures += 1
            if _is_timeout(exc):
                self._stats.timeouts += 1
            new_outage = now >= self._down_until
            if new_outage:
                self._stats.outages += 1
                self._down_until = now + self._backoff
                self._backoff = min(self._backoff * 2, self.max_retry_interval_s)
                self._known.clear()  # the store may come back empty
            went_down = self._consecutive_failures == 0  # not one per back-off interval
            self._consecutive_failures += 1
            queued = [w.task for w in self._put_tasks.values() if w.task is not None]
            probe = self.retry_interval_s > 0 and not self._probing and not self._closed
            self._probing = self._probing or probe
        if probe:
            threading.Thread(target=self._probe_until_back, daemon=True,
                             name=f"{self.tier_name}-probe").start()
        for task in queued:  # they would be dropped when they start; drop them now
            task.cancel()
        if operation not in ("put", "probe"):  # a write reports through its future
            call_observer(logger, self.on_error, _HOOK_OPERATIONS.get(operation, operation),
                          exc)
        if went_down:
            call_observer(logger, self.on_availability, False, exc)
            self._log_once("outage", "%s failed (%s: %s); lookups are misses and puts are "
                           "dropped until it answers again", operation,
                           type(exc).__name__, exc)
            # on a thread of its own: a transport's reset must not hold up this call
            threading.Thread(target=self._reset_transport, daemon=True,
                             name=f"{self.tier_name}-reset").start()

    def _reset_transport(self) -> None:
        try:
            self.transport.reset()
        except Exception as reset_exc:
            logger.debug("%s: reset after a failure failed: %s", self.tier_name, reset_exc)

    def _succeeded(self) -> None:
        if not self._consecutive_failures:
            return
        with self._lock:
            was_down = self._consecutive_failures > 0
            self._consecutive_failures = 0
            self._backoff = self.retry_interval_s
            self._down_until = 0.0
        if was_down:
            call_observer(logger, self.on_availability, True, None)
            logger.info("%s (%s): the store answers again", self.tier_name,
                        self.transport.description)

    def _call(self, operation: str, fn: Callable[..., T], *args: Any,
              attempt: _Attempt | None = None, release_late: bool = False) -> T:
        """``fn(*args)`` on an I/O thread, waited for at most ``timeout_s``.

        Raises `RemoteUnavailable` when the store is unavailable, the call failed or it
        timed out (then the store is marked unavailable, and ``attempt`` abandoned). A
        result that arrives after the deadline is released if ``release_late`` (a memory
        object).
        """
        if not self.available:
            raise RemoteUnavailable("in back-off after a failure")
        try:
            future = self._io.submit(fn, *args)
        except RuntimeError:  # closed
            raise RemoteUnavailable("the tier is closed") from None
        try:
            result = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            if attempt is not None:
                attempt.abandoned = True
            self._io.abandon(future)
            if release_late:
                future.add_done_callback(release_late_result)
            exc = TimeoutError(f"no answer within {self.timeout_s:g} s")
            self._failed(operation, exc)
            raise RemoteUnavailable(str(exc)) from None
        except CancelledError:  # the tier was closed meanwhile
            raise RemoteUnavailable("the tier is closed") from None
        except Exception as exc:
            self._failed(operation, exc)
            raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return result

    # -- keys ----------------------------------------------------------------------------

    def _name(self, key: CacheEngineKey) -> str:
        return self.transport.object_name(key.to_string())

    def _remember(self, key: CacheEngineKey) -> None:
        with self._lock:
            self._bad.pop(key, None)  # written or read whole: no longer a bad key
            if not self._known_max:
                return
            self._known[key] = None
            self._known.move_to_end(key)
            while len(self._known) > self._known_max:
                self._known.popitem(last=False)

    def _forget(self, key: CacheEngineKey) -> None:
        with self._lock:
            self._known.pop(key, None)

    def _is_bad(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._bad

    def _mark_bad(self, key: CacheEngineKey) -> None:
        with self._lock:
            self._known.pop(key, None)
            self._bad[key] = None
            while len(self._bad) > BAD_KEYS:  # bounded: forget the oldest marks
                self._bad.popitem(last=False)
            self._stats.bad_values += 1

    # -- the interface -------------------------------------------------------------------

    def contains(self, key: CacheEngineKey) -> bool:
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return True
        if self._is_bad(key):
            return False
        try:
            found = self._call("look up", self.transport.exists, self._name(key))
        except RemoteUnavailable:
            return False
        self._succeeded()
        if found:
            self._remember(key)
        return bool(found)

    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._put_tasks

    def submit_put_task(self, key: CacheEngineKey, memory_obj: MemoryObj) -> Future | None:
        """Write ``memory_obj`` under ``key`` on a writer thread; returns at once.

        The future ends with ``True`` once written, or with the write's exception (the
        put counted as dropped): its failure, `TimeoutError` ``timeout_s`` after the
        write started, or `RemoteUnavailable` when the store failed before it started or
        the tier was closed first. ``None`` when the put is not made (dropped, or the key
        is stored or being written already).
        """
        write = _Write(key, memory_obj)
        with self._lock:
            if self._closed or key in self._put_tasks or key in self._known:
                return None
            reason = ("unavailable" if not self.available else
                      "backlog" if len(self._put_tasks) >= self.max_pending_puts else None)
            dropped = reason is not None
            if dropped:
                self._stats.dropped_puts += 1
            else:
                memory_obj.ref_count_up()
                self._put_tasks[key] = write
        if dropped:
            self._log_once("dropped", "a put was dropped (store unavailable or %d writes "
                           "pending)", self.max_pending_puts)
            call_observer(logger, self.on_dropped, [key], memory_obj.get_size(), reason)
            return None
        try:
            task = self._writers.submit(self._write, write)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._put_tasks.pop(key, None)
            memory_obj.ref_count_down()
            return None
        write.task = task
        task.add_done_callback(lambda done: self._write_ended(write, done))
        return write.future

    def _write(self, write: _Write) -> bool:
        # On a writer thread. The deadline watcher fails the put ``timeout_s`` from now.
        if write.abandoned:
            raise RemoteUnavailable("the tier was closed before the write started")
        if not self.available:
            raise RemoteUnavailable("the store became unavailable before the write")
        write.deadline = self._deadlines.at(
            time.monotonic() + self.timeout_s,
            lambda closing: self._write_expired(write, closing))
        parts = self.serde.serialize_parts(write.obj, write.key)
        try:
            self.transport.put(self._name(write.key), parts)
        except Exception as exc:
            if not write.abandoned:
                self._failed("put", exc)
            raise
        if not write.abandoned:
            self._succeeded()
            self._remember(write.key)
        return True

    def _write_expired(self, write: _Write, closing: bool) -> None:
        # The deadline of a write that started: if it has not ended, the put is dropped.
        if closing:
            return  # `close` decides
        exc = TimeoutError(f"the write did not end within {self.timeout_s:g} s")
        if not self._settle_write(write, exc):
            return  # it ended in time
        write.abandoned = True
        self._failed("put", exc)  # drops the queued writes first ...
        if write.task is not None:
            self._writers.abandon(write.task)  # ... then another thread takes this one's

    def _settle_write(self, write: _Write, exc: BaseException | None) -> bool:
        """End the put's future (written if no ``exc``, else dropped) and free its backlog
        slot, unless that happened already. The memory stays referenced until the
        transport call returns (`_write_ended`)."""
        if not _settle(write.future, True if exc is None else None, exc):
            return False
        with self._lock:
            if self._put_tasks.get(write.key) is write:
                del self._put_tasks[write.key]
            if exc is None:
                self._stats.puts += 1
            else:
                self._stats.dropped_puts += 1
        return True

    def _write_ended(self, write: _Write, task: Future) -> None:
        # The writer thread is done with the memory (or the write never started).
        self._deadlines.cancel(write.deadline)
        try:
            if task.cancelled():
                exc: BaseException | None = RemoteUnavailable(
                    "dropped before it started: the store failed or the tier was closed")
            else:
                exc = task.exception()
            self._settle_write(write, exc)
        finally:
            write.obj.ref_count_down()

    def _read(self, key: CacheEngineKey, attempt: _Attempt) -> MemoryObj | None:
        # Runs on an I/O thread; never raises (a prefetch's future must not fail). The
        # outcome of an abandoned attempt is dropped: the caller gave up and counted it.
        if not self.available or attempt.abandoned:
            return None
        try:
            data = self.transport.get(self._name(key), self.max_value_bytes)
        except Exception as exc:
            if not attempt.abandoned:
                self._failed("get", exc)
            return None
        if attempt.abandoned:
            return None
        self._succeeded()
        if data is None:
            self._forget(key)
            self._count("misses")
            return None
        try:
            obj = None
            if self.max_value_bytes is None or len(data) <= self.max_value_bytes:
                obj = self.serde.deserialize(data, self.memory_allocator, key,
                                             self.chunk_spec)
        except Exception as exc:  # a serde must not raise; if it does, it is a bad value
            logger.debug("%s: serde raised on %s: %s", self.tier_name, key, exc)
            obj = None
        if obj is None:
            self._mark_bad(key)
            self._log_once("bad", "the value of %s is not this engine's chunk (corrupt, "
                           "partial, too long, stored under another key, of another "
                           "dtype or layout, written by another serde, or no memory for "
                           "it); treated as a miss until this process writes it", key)
            return None
        self._remember(key)
        self._count("hits")
        return obj

    def get_blocking(self, key: CacheEngineKey) -> MemoryObj | None:
        if self._is_bad(key):
            return None
        try:
            return self._call("get", self._read, key, _Attempt(), release_late=True)
        except RemoteUnavailable:
            return None

    def submit_prefetch_task(self, key: CacheEngineKey) -> Future | None:
        """Load ``key`` on an I/O thread. The future never fails; it ends within
        ``timeout_s`` with the object or ``None`` (a deadline watcher resolves it if the
        transport has not answered; a late object is released)."""
        if not self.available or self._is_bad(key):
            return None
        attempt = _Attempt()
        try:
            task = self._io.submit(self._read, key, attempt)
        except RuntimeError:  # closed
            return None
        future: Future = Future()
        future.set_running_or_notify_cancel()

        def expired(closing: bool) -> None:
            if not _settle(future, None):
                return  # loaded in time
            attempt.abandoned = True
            self._io.abandon(task)
            if not closing:
                self._failed("get", TimeoutError(f"no answer within {self.timeout_s:g} s"))

        deadline = self._deadlines.at(time.monotonic() + self.timeout_s, expired)

        def loaded(done: Future) -> None:
            self._deadlines.cancel(deadline)
            obj = None if done.cancelled() or done.exception() else done.result()
            if not _settle(future, obj) and obj is not None:
                obj.ref_count_down()  # the deadline came first

        task.add_done_callback(loaded)
        return future

    def remove(self, key: CacheEngineKey) -> bool:
        self._forget(key)
        try:
            removed = self._call("delete", self.transport.delete, self._name(key))
        except RemoteUnavailable:
            return False
        self._succeeded()
        return bool(removed)

    def close(self) -> None:
        """Wait at most ``timeout_s`` for pending writes, then give up on the rest
        (counted as dropped), resolve pending prefetches with ``None`` and release threads
        and connections; returns within `bound_s`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writes = list(self._put_tasks.values())
        self._stop_probing.set()
        deadline = time.monotonic() + self.timeout_s
        if writes:
            wait_futures([w.future for w in writes], timeout=self.timeout_s)
        given_up = 0
        for write in writes:
            if write.future.done():
                continue
            if not self._settle_write(write, RemoteUnavailable(
                    "the tier was closed before the write ended")):
                continue
            given_up += 1
            write.abandoned = True
            if write.task is not None:
                self._writers.abandon(write.task)  # cancels it if it has not started
        if given_up:
            logger.warning("%s (%s): closed with %d writes pending; they are dropped",
                           self.tier_name, self.transport.description, given_up)
        self._writers.shutdown()
        self._io.shutdown()
        self._deadlines.close()  # pending prefetches end now, with None
        closer = threading.Thread(target=self._close_transport, daemon=True,
                                  name=f"{self.tier_name}-close")
        closer.start()
        closer.join(max(deadline - time.monotonic(), 0.0) + _CLOSE_TRANSPORT_S)

    def _close_transport(self) -> None:
        try:
            self.transport.close()
        except Exception as exc:
            logger.debug("%s: closing the transport failed: %s", self.tier_name, exc)


#: `RemoteBackend._failed`'s operation names as the ``lmcache_storage_error`` hook spells them.
_HOOK_OPERATIONS = {"look up": "contains", "delete": "remove"}


def _is_timeout(exc: BaseException) -> bool:
    # Ours, the standard library's, and the clients' own (redis.exceptions.TimeoutError,
    # botocore's ReadTimeoutError / ConnectTimeoutError), which derive from neither.
    return isinstance(exc, (TimeoutError, FutureTimeout)) or "Timeout" in type(exc).__name__
