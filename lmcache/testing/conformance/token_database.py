"""Conformance tests of `TokenDatabase` (tokens to chunk keys)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from lmcache.abc.token_database import TokenDatabase


class TokenDatabaseConformance:
    """The token database contract as tests: subclass it in your test suite.

    Provide **one fixture**, ``make_database``: a callable ``make(chunk_size)`` returning
    a fresh database for that chunk size (and fixed engine metadata)::

        class TestMyDatabase(TokenDatabaseConformance):
            @pytest.fixture
            def make_database(self):
                return lambda chunk_size: MyDatabase(chunk_size)

    Set ``fixed_size_chunks = False`` when spans are not cut every ``chunk_size`` tokens
    (a radix-tree database); the span tests then only check coverage.

    Tested: spans cover exactly the masked tokens in order; keys are deterministic
    across instances and across processes (``PYTHONHASHSEED``); a key depends on the
    whole prefix; malformed masks raise ``ValueError``. Override ``database_source`` to
    enable the cross-process test: Python code that defines ``make(chunk_size)``.
    """

    fixed_size_chunks: bool = True
    chunk_size: int = 16
    database_source: str | None = None

    @pytest.fixture
    def make_database(self) -> Callable[[int], TokenDatabase]:
        raise NotImplementedError(
            f"{type(self).__name__} must override the make_database fixture")

    @pytest.fixture
    def db(self, make_database) -> TokenDatabase:
        return make_database(self.chunk_size)

    @staticmethod
    def tokens(n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 50_000, (n,), generator=g, dtype=torch.int64)

    def spans(self, db, tokens, mask=None):
        return [(int(s), int(e), k) for s, e, k in db.process_tokens(tokens, mask)]

    @pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 100])
    def test_spans_cover_the_tokens(self, db, n):
        spans = self.spans(db, self.tokens(n))
        assert spans and spans[0][0] == 0 and spans[-1][1] == n
        for (_, e1, _), (s2, _, _) in zip(spans, spans[1:]):
            assert e1 == s2, "spans are not contiguous"
        assert all(s < e for s, e, _ in spans)
        if self.fixed_size_chunks:
            assert [s for s, _, _ in spans] == list(range(0, n, self.chunk_size))
            assert all(e - s == self.chunk_size for s, e, _ in spans[:-1])
        assert len({k for _, _, k in spans}) == len(spans), "two spans share a key"

    def test_mask_skips_the_prefix(self, db):
        tokens = self.tokens(100)
        full = self.spans(db, tokens)
        mask = torch.ones(100, dtype=torch.bool)
        mask[: 2 * self.chunk_size] = False
        masked = self.spans(db, tokens, mask)
        assert masked == [s for s in full if s[0] >= 2 * self.chunk_size]
        assert self.spans(db, tokens, torch.ones(100, dtype=torch.bool)) == full

    @pytest.mark.parametrize("bad", ["not_multiple", "not_prefix", "wrong_length"])
    def test_malformed_masks_raise(self, db, bad):
        tokens = self.tokens(64)
        mask = torch.ones(64, dtype=torch.bool)
        if bad == "not_multiple":
            mask[: self.chunk_size + 1] = False
        elif bad == "not_prefix":
            mask[self.chunk_size: 2 * self.chunk_size] = False
        else:
            mask = torch.ones(63, dtype=torch.bool)
        with pytest.raises(ValueError):
            list(db.process_tokens(tokens, mask))

    def test_keys_are_deterministic(self, make_database):
        tokens = self.tokens(80, seed=3)
        a = self.spans(make_database(self.chunk_size), tokens)
        b = self.spans(make_database(self.chunk_size), tokens.clone())
        assert a == b
        as_list = self.spans(make_database(self.chunk_size), tokens.tolist()) \
            if self._accepts_lists() else a
        assert as_list == a

    def _accepts_lists(self) -> bool:
        return False

    def test_key_depends_on_the_whole_prefix(self, db):
        tokens = self.tokens(64, seed=4)
        base = self.spans(db, tokens)
        changed = tokens.clone()
        changed[self.chunk_size] += 1  # inside the second chunk
        other = self.spans(db, changed)
        assert other[0] == base[0], "a later token changed an earlier chunk's key"
        for b, o in zip(base[1:], other[1:]):
            assert b[2] != o[2], "a chunk after a changed token kept its key"
        longer = self.spans(db, torch.cat([tokens, self.tokens(20, seed=5)]))
        full_chunks = [s for s in base if s[1] - s[0] == self.chunk_size]
        assert longer[: len(full_chunks)] == full_chunks, \
            "extending a prompt changed the keys of its complete chunks"

    def test_keys_survive_another_process(self, db):
        if self.database_source is None:
            pytest.skip(f"{type(self).__name__} does not set database_source")
        tokens = self.tokens(40, seed=6)
        here = [k for _, _, k in self.spans(db, tokens)]
        code = (self.database_source + "\nimport torch\n"
                f"db = make({self.chunk_size})\n"
                f"t = torch.tensor({tokens.tolist()})\n"
                "print([str(k) for _, _, k in db.process_tokens(t)])\n")
        env = dict(os.environ, PYTHONHASHSEED="12345")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.strip()
        assert out == repr([str(k) for k in here]), "keys differ in another process"
