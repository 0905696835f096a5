"""Threads that never block their owner: a pool of daemon threads whose stuck threads are
replaced, and a deadline watcher -- what the remote kit bounds every call with.

`DaemonPool` is like ``ThreadPoolExecutor``, but its threads are daemons (a call hung in
a store never blocks the exit of the process), a future can be abandoned (its thread is
replaced, up to a number of spares) and `DaemonPool.shutdown` never waits. `Deadlines`
runs a callback when a deadline passes, on one watcher thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["DaemonPool", "Deadlines"]

logger = logging.getLogger(__name__)


class DaemonPool:
    """A thread pool of daemon threads whose stuck threads are replaced.

    Like ``ThreadPoolExecutor`` (`submit` returns a `Future`; a queued future that is
    cancelled never runs), with two differences that a remote tier needs: the threads
    are daemons, so that a call hung in a transport does not keep the process from
    exiting (the interpreter joins every ``ThreadPoolExecutor`` thread at exit); and
    `abandon` tells the pool that nobody waits for a running call any more, so that
    another thread serves the queue meanwhile: at most ``workers`` threads serve it, and
    at most ``spares`` more may be stuck in abandoned calls.
    """

    def __init__(self, workers: int, spares: int, name: str) -> None:
        self._workers = workers
        self._limit = workers + spares
        self._name = name
        self._tasks: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple] | None] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._serving = 0  # threads that take tasks from the queue
        self._threads = 0  # every thread, stuck ones included
        self._running: dict[Future, bool] = {}  # running task -> abandoned
        self._count = itertools.count()
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads alive now, stuck ones included."""
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a closed pool")
            self._tasks.put((future, fn, args))
            self._grow()
        return future

    def _grow(self) -> None:  # under the lock
        if self._serving < self._workers and self._threads < self._limit:
            self._serving += 1
            self._threads += 1
            threading.Thread(target=self._work, name=f"{self._name}_{next(self._count)}",
                             daemon=True).start()

    def _work(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:  # closed
                with self._lock:
                    self._serving -= 1
                    self._threads -= 1
                return
            if not self._run(*item):
                return
            item = None  # hold nothing while idle

    def _run(self, future: Future, fn: Callable[..., Any], args: tuple) -> bool:
        """Run one task; returns whether this thread goes on serving the queue."""
        if not future.set_running_or_notify_cancel():
            return True
        with self._lock:
            self._running[future] = False
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        with self._lock:
            if not self._running.pop(future, False):
                return True
            # abandoned: another thread took this one's place; rejoin only if needed
            if self._closed or self._serving >= self._workers:
                self._threads -= 1
                return False
            self._serving += 1
            return True

    def abandon(self, future: Future) -> None:
        """Nobody waits for ``future`` any more: cancel it if it has not started, else
        let another thread serve the queue while its call goes on."""
        if future.cancel():
            return
        with self._lock:
            if self._running.get(future) is False:
                self._running[future] = True
                self._serving -= 1
                if not self._closed:
                    self._grow()

    def shutdown(self) -> None:
        """Cancel the tasks that have not started and let idle threads end; waits for
        nothing (threads in running calls end when their calls return)."""
        with self._lock:
            self._closed = True
            threads = self._threads
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(threads):
            self._tasks.put(None)


class Deadlines:
    """One daemon thread that calls ``fn(False)`` at each deadline given to `at`, unless
    it was cancelled; `close` calls the pending ones at once with ``fn(True)``.
    Callbacks must be quick."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []  # [when, seq, fn or None when cancelled]
        self._count = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def at(self, when: float, fn: Callable[[bool], None]) -> list[Any] | None:
        """Call ``fn`` at ``when`` (`time.monotonic`); returns a handle for `cancel`."""
        entry: list[Any] | None = [when, next(self._count), fn]
        with self._cond:
            closed = self._closed
            if closed:
                entry = None
            else:
                heapq.heappush(self._heap, entry)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name=self._name,
                                                    daemon=True)
                    self._thread.start()
                elif self._heap[0] is entry:  # the earliest now: wake the watcher
                    self._cond.notify()
        if closed:
            _call_quietly(fn, True)
        return entry

    def cancel(self, entry: list[Any] | None) -> None:
        """The deadline of ``entry`` is not needed any more (drops its references)."""
        if entry is not None:
            with self._cond:
                entry[2] = None

    def _watch(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        fn = heapq.heappop(self._heap)[2]
                        if fn is None:
                            continue
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            _call_quietly(fn, False)
            fn = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = [entry[2] for entry in sorted(self._heap) if entry[2] is not None]
            self._heap.clear()
            self._cond.notify()
        for fn in pending:
            _call_quietly(fn, True)


def _call_quietly(fn: Callable[[bool], None], closing: bool) -> None:
    try:
        fn(closing)
    except Exception:
        logger.exception("a remote tier's deadline callback failed")


