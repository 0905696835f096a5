"""Conformance tests of `GPUConnectorInterface` (serving-engine KV to memory objects)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmcache.abc.gpu_connector import GPUConnectorInterface
from lmcache.abc.memory import MemoryFormat
from lmcache.builtin.allocators.region import HostMemoryAllocator
from lmcache.testing.conformance._util import fill_random


class GPUConnectorConformance:
    """The connector contract as tests: subclass it in your test suite.

    Provide **two things**:

    - the ``connector`` fixture, your connector instance;
    - ``make_kv(self, num_tokens, dtype)``: the keyword arguments your connector's
      ``from_gpu``/``to_gpu`` take (``kvcaches``, ``slot_mapping``, ...) for a sequence of
      ``num_tokens`` tokens, with freshly allocated engine KV. Every call must lay the
      sequence out the same way (same slot mapping: use a fixed seed), so that KV
      stored from one set of tensors can be loaded into another.

    ::

        class TestMyConnector(GPUConnectorConformance):
            @pytest.fixture
            def connector(self):
                return MyConnector(hidden_dim_size=64, num_layers=2)

            def make_kv(self, num_tokens, dtype):
                return {"kvcaches": [torch.zeros(2, num_tokens, 64, dtype=dtype)] * 2}

    The kit fills every tensor that ``kv_tensors(kwargs)`` returns (by default, all
    tensors inside ``kwargs["kvcaches"]``) with random bits. Optional attributes:
    ``token_alignment`` (chunks start on a multiple of it: a block size for connectors
    that move whole blocks), ``dtypes``, ``device`` (``"cuda"``: mark the class
    ``@pytest.mark.gpu``).

    Tested: bit-exact store/load round trips over a middle chunk and a short last chunk;
    tokens outside ``[start, end)`` are not written; the memory object comes out as
    KV_BLOB of ``get_shape(end - start)``; a missing keyword or a memory object of the
    wrong shape raises ``ValueError`` before anything is copied.
    """

    token_alignment: int = 1
    num_tokens: int = 64
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    device: str = "cpu"

    @pytest.fixture
    def connector(self) -> GPUConnectorInterface:
        raise NotImplementedError(f"{type(self).__name__} must override the connector fixture")

    def make_kv(self, num_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement make_kv()")

    def kv_tensors(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []

        def walk(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)

        walk(kwargs["kvcaches"])
        unique: dict[int, torch.Tensor] = {}
        for t in out:
            unique.setdefault(id(t), t)
        return list(unique.values())

    # -- helpers ------------------------------------------------------------------------------

    @pytest.fixture
    def allocator(self):
        allocator = HostMemoryAllocator(64 << 20)
        yield allocator
        assert allocator.num_active_allocations == 0

    def _kv(self, dtype: torch.dtype, seed: int) -> dict[str, Any]:
        kwargs = self.make_kv(self.num_tokens, dtype)
        for i, t in enumerate(self.kv_tensors(kwargs)):
            fill_random(t, seed * 1000 + i)
            if t.dtype.is_floating_point:  # no NaN payloads: keep comparisons simple
                t.nan_to_num_(0.0, 0.0, 0.0)
        return kwargs

    def _store(self, connector, allocator, kv, start: int, end: int, dtype):
        obj = allocator.allocate(connector.get_shape(end - start), dtype,
                                 MemoryFormat.KV_BLOB)
        assert obj is not None
        connector.from_gpu(obj, start, end, **kv)
        return obj

    def _ranges(self) -> tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]:
        a = self.token_alignment
        n = self.num_tokens
        q = max(a, (n // 4) // a * a)
        middle = (q, 3 * q)
        tail_start = 3 * q
        tail = (tail_start, n - 1 if n - 1 > tail_start else n)
        return middle, tail, [(0, q)]

    # -- tests ------------------------------------------------------------------------------

    @pytest.mark.parametrize("which", ["middle", "tail"])
    def test_round_trip_is_bit_exact(self, connector, allocator, which):
        middle, tail, _ = self._ranges()
        start, end = middle if which == "middle" else tail
        for dtype in self.dtypes:
            src = self._kv(dtype, 1)
            stored = self._store(connector, allocator, src, start, end, dtype)
            assert stored.get_memory_format() == MemoryFormat.KV_BLOB
            assert tuple(stored.get_shape()) == tuple(connector.get_shape(end - start))
            dst = self._kv(dtype, 2)
            connector.to_gpu(stored, start, end, **dst)
            loaded = self._store(connector, allocator, dst, start, end, dtype)
            assert bytes(loaded.byte_array) == bytes(stored.byte_array), \
                f"{dtype}: tokens [{start}, {end}) differ after store and load"
            stored.ref_count_down()
            loaded.ref_count_down()

    def test_load_writes_only_its_tokens(self, connector, allocator):
        (start, end), _, outside = self._ranges()
        dtype = self.dtypes[0]
        src = self._kv(dtype, 1)
        stored = self._store(connector, allocator, src, start, end, dtype)
        dst, pristine = self._kv(dtype, 2), self._kv(dtype, 2)
        connector.to_gpu(stored, start, end, **dst)
        changed = sum(int((a.view(torch.uint8) != b.view(torch.uint8)).sum())
                      for a, b in zip(self.kv_tensors(dst), self.kv_tensors(pristine)))
        assert changed <= stored.get_size(), \
            f"to_gpu changed {changed} bytes of engine KV for a {stored.get_size()}-byte chunk"
        for s, e in outside:
            got = self._store(connector, allocator, dst, s, e, dtype)
            want = self._store(connector, allocator, pristine, s, e, dtype)
            assert bytes(got.byte_array) == bytes(want.byte_array), \
                f"to_gpu of [{start}, {end}) wrote tokens [{s}, {e})"
            got.ref_count_down()
            want.ref_count_down()
        stored.ref_count_down()

    def test_missing_keyword_raises(self, connector, allocator):
        (start, end), _, _ = self._ranges()
        dtype = self.dtypes[0]
        kv = self._kv(dtype, 1)
        obj = allocator.allocate(connector.get_shape(end - start), dtype, MemoryFormat.KV_BLOB)
        for name in kv:
            partial = {k: v for k, v in kv.items() if k != name}
            with pytest.raises(ValueError):
                connector.from_gpu(obj, start, end, **partial)
        obj.ref_count_down()

    def test_wrong_shape_raises_before_copying(self, connector, allocator):
        (start, end), _, _ = self._ranges()
        dtype = self.dtypes[0]
        src = self._kv(dtype, 1)
        stored = self._store(connector, allocator, src, start, end, dtype)
        shape = list(connector.get_shape(end - start))
        shape[-1] += 1
        wrong = allocator.allocate(tuple(shape), dtype, MemoryFormat.KV_BLOB)
        with pytest.raises(ValueError):
            connector.from_gpu(wrong, start, end, **src)
        dst, pristine = self._kv(dtype, 2), self._kv(dtype, 2)
        with pytest.raises(ValueError):
            connector.to_gpu(wrong, start, end, **dst)
        for a, b in zip(self.kv_tensors(dst), self.kv_tensors(pristine)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), \
                "a refused to_gpu wrote engine KV"
        wrong.ref_count_down()
        stored.ref_count_down()

    def test_get_shape_grows_with_tokens(self, connector):
        a = self.token_alignment
        small, big = connector.get_shape(a), connector.get_shape(4 * a)
        assert torch.Size(small).numel() < torch.Size(big).numel()
