"""vLLM's KV events show what lmcache stores (a cache-aware router can see the tier).

vLLM with lmcache and ``kv_events_config`` (vLLM's ZMQ publisher, bound to an ipc://
socket in the test's directory: nothing leaves the machine);
the test subscribes as a router would and decodes vLLM's ``KVEventBatch`` messages. A
prompt of 600 tokens stores two whole chunks of 256 tokens: they must arrive as
``BlockStored`` events of ``medium="local_cpu"``, ``block_size=256``, with the chunks'
tokens, chained by their parent hashes; the same prompt again stores nothing and
publishes no new lmcache event.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.e2e.conftest import random_tokens
from tests.kvutil import wait_until

PROMPT = random_tokens(600, 600)
CHUNK = 256


class Subscriber:
    """vLLM's KV event stream, decoded, on a thread of its own."""

    def __init__(self, endpoint: str) -> None:
        zmq = pytest.importorskip("zmq")
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        self._sock.connect(endpoint)
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._zmq = zmq
        self.events: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                parts = self._sock.recv_multipart()
            except self._zmq.Again:
                continue
            self.events.extend(self._decoder.decode(parts[-1]).events)

    def ours(self) -> list:
        return [e for e in self.events if getattr(e, "medium", None) == "local_cpu"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(0)
        self._ctx.term()


def test_stored_chunks_are_published_as_vllm_kv_events(tiny_llama, vllm_factory, tmp_path):
    endpoint = f"ipc://{tmp_path / 'kv-events.sock'}"  # vLLM binds ipc endpoints
    events_config = {"enable_kv_cache_events": True, "publisher": "zmq",
                     "endpoint": endpoint}
    proc = vllm_factory(tiny_llama, tmp_path, lmcache=True, prefix_caching=True,
                        name="events", env={"LMCACHE_E2E_LLM_ARGS": json.dumps(
                            {"kv_events_config": events_config})})
    sub = Subscriber(endpoint)
    try:
        time.sleep(1.0)  # a SUB socket misses what is published before it joins
        proc.generate([PROMPT])
        assert wait_until(lambda: len(sub.ours()) >= 2, within=30), (sub.events, proc.log_tail())
        ours = sub.ours()
        assert len(ours) == 2, ours  # the 88 tokens of the partial last chunk: no event
        assert [e.token_ids for e in ours] == [PROMPT[:CHUNK], PROMPT[CHUNK:2 * CHUNK]]
        assert {e.block_size for e in ours} == {CHUNK}
        assert ours[0].parent_block_hash is None
        assert ours[1].parent_block_hash == ours[0].block_hashes[0]
        assert ours[0].block_hashes != ours[1].block_hashes
        # vLLM's own blocks are published beside them, in its block size
        assert any(getattr(e, "block_size", None) == 128 and e.medium != "local_cpu"
                   for e in sub.events if hasattr(e, "token_ids"))
        proc.call(op="reset_prefix_cache")
        proc.generate([PROMPT])  # loaded, not stored again
        time.sleep(2.0)
        assert len(sub.ours()) == 2, sub.ours()
    finally:
        sub.close()
        proc.quit()
