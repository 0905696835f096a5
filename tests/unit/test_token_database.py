"""ChunkedTokenDatabase and CacheEngineKey: chunking, masks, the prefix-hash chain, salts,
stability across processes and input types, and the key's string form."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache.experimental.token_database import ChunkedTokenDatabase, TokenDatabase
from lmcache.utils import MAX_MODEL_CHARS, CacheEngineKey
from lmcache.utils import _encode as _encode_model

REPO_ROOT = Path(__file__).resolve().parents[2]
DOMAIN = b"lmcache/chunked-prefix/v1\x00"
HEX64 = "0123456789abcdef" * 4


def make_metadata(model_name: str = "org/model", world_size: int = 1,
                  worker_id: int = 0, fmt: str = "vllm") -> LMCacheEngineMetadata:
    return LMCacheEngineMetadata(model_name, world_size, worker_id, fmt, torch.bfloat16,
                                 (2, 2, 256, 8, 128))


def make_db(chunk_size: int = 4, hash_name: str = "sha256", salt: str | None = None,
            metadata: LMCacheEngineMetadata | None = None) -> ChunkedTokenDatabase:
    return ChunkedTokenDatabase(LMCacheEngineConfig(chunk_size=chunk_size),
                                metadata or make_metadata(), hash_name=hash_name, salt=salt)


def keys_of(db: ChunkedTokenDatabase, tokens, mask=None, **kw) -> list[CacheEngineKey]:
    return [key for _, _, key in db.process_tokens(tokens, mask, **kw)]


def spans_of(db: ChunkedTokenDatabase, tokens, mask=None) -> list[tuple[int, int]]:
    return [(start, end) for start, end, _ in db.process_tokens(tokens, mask)]


def fft_mask(num_false: int, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[:num_false] = False
    return mask


# ---------------------------------------------------------------------------------------
# An independent reference of the documented hash chain
# ---------------------------------------------------------------------------------------


def _salt_part(part: str | None) -> bytes:
    if part is None:
        return b"\xff"
    data = part.encode("utf-8")
    return len(data).to_bytes(8, "little") + data


def reference_hashes(tokens: list[int], chunk_size: int, algo: str = "sha256",
                     salt: str | None = None, cache_salt: str | None = None) -> list[str]:
    """h_{-1} = H(domain ‖ salt ‖ cache_salt); h_i = H(h_{i-1} ‖ int32le(tokens_i))."""
    new = getattr(hashlib, algo)
    prev = new(DOMAIN + _salt_part(salt) + _salt_part(cache_salt)).digest()
    out = []
    for start in range(0, len(tokens), chunk_size):
        chunk = tokens[start:start + chunk_size]
        prev = new(prev + struct.pack(f"<{len(chunk)}i", *chunk)).digest()
        out.append(prev.hex())
    return out


# ---------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------


def test_is_a_token_database():
    assert isinstance(make_db(), TokenDatabase)


@pytest.mark.parametrize(("n", "chunk_size", "expected"), [
    (10, 4, [(0, 4), (4, 8), (8, 10)]),
    (8, 4, [(0, 4), (4, 8)]),
    (3, 4, [(0, 3)]),
    (4, 4, [(0, 4)]),
    (1, 1, [(0, 1)]),
    (5, 1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    (0, 4, []),
])
def test_chunk_spans(n, chunk_size, expected):
    db = make_db(chunk_size)
    assert spans_of(db, torch.arange(n)) == expected


def test_default_config_chunk_size_is_used():
    db = ChunkedTokenDatabase(LMCacheEngineConfig(), make_metadata())
    assert spans_of(db, torch.arange(600)) == [(0, 256), (256, 512), (512, 600)]


@given(n=st.integers(0, 300), chunk_size=st.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_spans_tile_the_tokens(n, chunk_size):
    db = make_db(chunk_size)
    out = list(db.process_tokens(torch.arange(n)))
    assert len(out) == -(-n // chunk_size)
    pos = 0
    for start, end, key in out:
        assert start == pos
        assert 0 < end - start <= chunk_size
        assert end - start == chunk_size or end == n
        assert isinstance(key, CacheEngineKey)
        pos = end
    assert pos == n
    assert len({key for _, _, key in out}) == len(out)


def test_empty_tokens_give_no_chunks():
    db = make_db()
    assert list(db.process_tokens(torch.tensor([], dtype=torch.long))) == []
    assert list(db.process_tokens([])) == []
    assert list(db.process_tokens(torch.tensor([], dtype=torch.long),
                                  torch.tensor([], dtype=torch.bool))) == []


def test_partial_last_chunk_differs_from_full_chunk():
    db = make_db(4)
    short = keys_of(db, [1, 2, 3, 4, 5, 6])
    full = keys_of(db, [1, 2, 3, 4, 5, 6, 7, 8])
    assert short[0] == full[0]
    assert short[1] != full[1]


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


def test_mask_none_is_all_true():
    db = make_db(4)
    tokens = torch.arange(10)
    assert list(db.process_tokens(tokens, None)) == list(db.process_tokens(tokens))
    assert list(db.process_tokens(tokens, torch.ones(10, dtype=torch.bool))) == \
        list(db.process_tokens(tokens))


@pytest.mark.parametrize(("num_false", "expected_spans"), [
    (0, [(0, 4), (4, 8), (8, 10)]),
    (4, [(4, 8), (8, 10)]),
    (8, [(8, 10)]),
])
def test_mask_skips_leading_chunks_keeping_their_keys(num_false, expected_spans):
    db = make_db(4)
    tokens = torch.arange(100, 110)
    unmasked = list(db.process_tokens(tokens))
    masked = list(db.process_tokens(tokens, fft_mask(num_false, 10)))
    assert [(s, e) for s, e, _ in masked] == expected_spans
    # masked chunks still feed the chain: the remaining keys equal the unmasked ones
    assert masked == unmasked[num_false // 4:]


@given(n=st.integers(0, 120), chunk_size=st.integers(1, 16), data=st.data())
@settings(max_examples=60, deadline=None)
def test_masked_keys_are_a_suffix_of_unmasked_keys(n, chunk_size, data):
    num_false = data.draw(st.integers(0, n // chunk_size)) * chunk_size
    db = make_db(chunk_size)
    tokens = torch.arange(n) * 7 + 3
    unmasked = list(db.process_tokens(tokens))
    masked = list(db.process_tokens(tokens, fft_mask(num_false, n)))
    assert masked == unmasked[num_false // chunk_size:]


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.uint8])
def test_a_mask_of_zeros_and_ones_of_another_dtype_is_accepted(dtype):
    # upstream's callers pass such masks; they are unambiguous
    db = make_db(4)
    tokens = torch.arange(10)
    mask = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=dtype)
    assert list(db.process_tokens(tokens, mask)) == list(db.process_tokens(tokens))[1:]


@pytest.mark.parametrize("values", [[0, 0, 0, 0, 2, 2, 2, 2, 2, 2], [0.0] * 4 + [0.5] * 6])
def test_a_mask_with_other_values_is_refused(values):
    # issue 11: 2 or 0.5 is not silently coerced to True
    db = make_db(4)
    with pytest.raises(ValueError, match="hold only 0 and 1"):
        list(db.process_tokens(torch.arange(10), torch.tensor(values)))


def test_all_false_mask_gives_no_chunks():
    db = make_db(4)
    assert list(db.process_tokens(torch.arange(8), torch.zeros(8, dtype=torch.bool))) == []


def test_all_false_mask_whose_length_is_not_a_multiple_is_rejected():
    # The spec: "ValueError if the number of Falses in the mask is not a multiple of the
    # chunk size" — no exception for a mask that is all False.
    db = make_db(4)
    with pytest.raises(ValueError, match="multiple"):
        db.process_tokens(torch.arange(10), torch.zeros(10, dtype=torch.bool))


@pytest.mark.parametrize("num_false", [1, 3, 5, 7, 9])
def test_mask_falses_not_a_multiple_of_chunk_size(num_false):
    db = make_db(4)
    with pytest.raises(ValueError, match=r"multiple of the chunk size \(4\)"):
        db.process_tokens(torch.arange(10), fft_mask(num_false, 10))


@pytest.mark.parametrize("pattern", [
    "TTF", "FTF", "TFT", "TFFFF", "TTTTFFFF", "FFFFTTTTF", "TFFFFTTT",
])
def test_mask_not_of_the_form_fff_ttt(pattern):
    db = make_db(4)
    mask = torch.tensor([c == "T" for c in pattern])
    with pytest.raises(ValueError, match="FFF"):
        db.process_tokens(torch.arange(len(pattern)), mask)


def test_mask_not_of_the_form_even_when_falses_are_a_multiple():
    # 4 Falses (a multiple of 4) but not all at the front
    db = make_db(4)
    mask = torch.tensor([True] * 4 + [False] * 4 + [True] * 2)
    with pytest.raises(ValueError):
        db.process_tokens(torch.arange(10), mask)


@pytest.mark.parametrize("mask_len", [0, 9, 11, 20])
def test_mask_of_wrong_length(mask_len):
    db = make_db(4)
    with pytest.raises(ValueError, match="one entry per token"):
        db.process_tokens(torch.arange(10), torch.ones(mask_len, dtype=torch.bool))


def test_mask_of_wrong_shape_or_type():
    db = make_db(4)
    with pytest.raises(ValueError):
        db.process_tokens(torch.arange(8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        db.process_tokens(torch.arange(8), [True] * 8)


# ---------------------------------------------------------------------------------------
# Known-answer test of the hash chain
# ---------------------------------------------------------------------------------------


# Pinned so that a change of the on-disk naming (which orphans every stored cache) is
# noticed: chunk_size 4, tokens 0..9, sha256, no salts.
GOLDEN_SHA256_0_TO_9 = [
    "b157855aad7de06864a57144868506e177465235d5fb4daa35ce8b51d5527020",
    "d321911b9052d7d4fa3dbefbf81a4a265852490dd1cbdd0784da731c8f36aac8",
    "64fd1aada011dadb54e770d6d961025dbc15dd17ffa81769e4a5fcf836289e74",
]


@pytest.mark.parametrize("algo", ["sha256", "blake2b", "sha512", "sha3_256"])
@pytest.mark.parametrize(("salt", "cache_salt"), [
    (None, None), ("tenant", None), (None, "req"), ("tenant", "req"), ("", ""),
    ("ünï", "😀"),
])
def test_hash_chain_known_answer(algo, salt, cache_salt):
    tokens = [0, 1, -1, 2**31 - 1, -(2**31), 50256, 7, 8, 9, 10, 11]
    db = make_db(4, algo, salt=salt)
    expected = reference_hashes(tokens, 4, algo, salt, cache_salt)
    assert db.prefix_hashes(tokens, cache_salt) == expected
    assert [k.chunk_hash for k in keys_of(db, torch.tensor(tokens), cache_salt=cache_salt)] \
        == expected


def test_hash_chain_sha256_literal():
    # Written out by hand from the class docstring, without the helper above.
    seed = hashlib.sha256(b"lmcache/chunked-prefix/v1\x00" + b"\xff" + b"\xff").digest()
    h0 = hashlib.sha256(seed + b"\x01\x00\x00\x00\x02\x00\x00\x00").digest()
    h1 = hashlib.sha256(h0 + b"\x03\x00\x00\x00").digest()
    db = make_db(2)
    assert db.prefix_hashes([1, 2, 3]) == [h0.hex(), h1.hex()]
    assert reference_hashes(list(range(10)), 4) == GOLDEN_SHA256_0_TO_9
    assert make_db(4).prefix_hashes(list(range(10))) == GOLDEN_SHA256_0_TO_9


def test_hash_algorithms_differ_and_have_their_digest_length():
    tokens = list(range(10))
    lengths = {"sha256": 64, "sha512": 128, "blake2b": 128, "sha3_256": 64}
    seen = set()
    for algo, hex_len in lengths.items():
        hashes = make_db(4, algo).prefix_hashes(tokens)
        assert all(len(h) == hex_len for h in hashes)
        seen.add(hashes[0])
    assert len(seen) == len(lengths)


def test_unknown_hash_algorithm_is_rejected():
    with pytest.raises(ValueError, match="hash must be one of"):
        make_db(4, "md5")


# ---------------------------------------------------------------------------------------
# Stability across input types and processes
# ---------------------------------------------------------------------------------------


def test_same_keys_for_every_input_type():
    db = make_db(4)
    values = [5, 0, 2**31 - 1, 17, 3, -4, 99, 100000, 12]
    expected = keys_of(db, torch.tensor(values, dtype=torch.int64))
    assert len(expected) == 3
    variants = [
        torch.tensor(values, dtype=torch.int32),
        values,
        tuple(values),
        np.array(values, dtype=np.int64),
        np.array(values, dtype=np.int32),
        np.array(values, dtype=">i8"),  # big-endian
        np.array(values, dtype=">i4"),
        torch.tensor([0] + values, dtype=torch.int64)[1:],  # storage offset
        torch.tensor(values, dtype=torch.int64).repeat_interleave(2)[::2],  # strided
    ]
    for tokens in variants:
        assert keys_of(db, tokens) == expected, type(tokens)


def test_small_unsigned_and_narrow_dtypes_agree():
    db = make_db(4)
    values = [1, 2, 3, 200, 255, 0]
    expected = keys_of(db, torch.tensor(values, dtype=torch.int64))
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert keys_of(db, torch.tensor(values, dtype=dtype)) == expected
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64, np.int16):
        assert keys_of(db, np.array(values, dtype=dtype)) == expected


CHILD = textwrap.dedent("""
    import torch
    from lmcache.experimental.config import LMCacheEngineConfig, LMCacheEngineMetadata
    from lmcache.experimental.token_database import ChunkedTokenDatabase
    md = LMCacheEngineMetadata("org/model", 1, 0, "vllm", torch.bfloat16, (2, 2, 256, 8, 128))
    for algo, salt, cache_salt in [("sha256", None, None), ("blake2b", "t", "r")]:
        db = ChunkedTokenDatabase(LMCacheEngineConfig(chunk_size=4), md, hash_name=algo,
                                  salt=salt)
        for _, _, key in db.process_tokens(torch.arange(10) * 3, cache_salt=cache_salt):
            print(str(key))
""")


def test_same_keys_in_a_process_with_another_hash_seed():
    expected = []
    for algo, salt, cache_salt in [("sha256", None, None), ("blake2b", "t", "r")]:
        db = make_db(4, algo, salt=salt)
        expected += [str(k) for k in keys_of(db, torch.arange(10) * 3, cache_salt=cache_salt)]
    seed = "456" if os.environ.get("PYTHONHASHSEED") == "123" else "123"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120,
        cwd=REPO_ROOT, env={**os.environ, "PYTHONHASHSEED": seed})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected


# ---------------------------------------------------------------------------------------
# The prefix property
# ---------------------------------------------------------------------------------------


def test_keys_of_a_prefix_are_the_first_keys_of_the_whole():
    db = make_db(4)
    tokens = torch.arange(1000, 1030)
    whole = list(db.process_tokens(tokens))
    for n in range(0, 31, 4):
        assert list(db.process_tokens(tokens[:n])) == whole[:n // 4]


@given(tokens=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=60),
       extra=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20),
       chunk_size=st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_prefix_property(tokens, extra, chunk_size):
    db = make_db(chunk_size)
    full_chunks = len(tokens) // chunk_size
    short = keys_of(db, tokens)
    longer = keys_of(db, tokens + extra)
    assert short[:full_chunks] == longer[:full_chunks]


@pytest.mark.parametrize("chunk", [0, 1, 2, 4])
def test_changing_one_token_changes_that_chunk_and_every_later_one(chunk):
    db = make_db(4)
    tokens = torch.arange(500, 518)  # 5 chunks, the last partial
    before = keys_of(db, tokens)
    changed = tokens.clone()
    changed[chunk * 4 + (1 if chunk < 4 else 0)] += 1
    after = keys_of(db, changed)
    assert after[:chunk] == before[:chunk]
    for i in range(chunk, len(before)):
        assert after[i] != before[i]


def test_swapping_tokens_across_chunks_changes_keys():
    db = make_db(2)
    a = keys_of(db, [1, 2, 3, 4])
    b = keys_of(db, [1, 3, 2, 4])
    assert a[0] != b[0] and a[1] != b[1]


def test_token_boundary_is_not_ambiguous():
    # int32 encoding: 256 and [0, 1] must not collide (each token is 4 bytes)
    db = make_db(8)
    assert keys_of(db, [256]) != keys_of(db, [0, 1])
    assert keys_of(db, [0]) != keys_of(db, [0, 0])


# ---------------------------------------------------------------------------------------
# Salts
# ---------------------------------------------------------------------------------------


ENGINE_SALTS = [None, "", "a", "b", "ab", "a\x00", "ä", "\xff"]
REQUEST_SALTS = [None, "", "a", "b", "ab", "\xff"]


def test_different_salts_never_share_a_key():
    tokens = torch.arange(10)
    seen: dict[CacheEngineKey, tuple] = {}
    for salt in ENGINE_SALTS:
        db = make_db(4, salt=salt)
        for cache_salt in REQUEST_SALTS:
            for key in keys_of(db, tokens, cache_salt=cache_salt):
                assert key not in seen, (salt, cache_salt, seen.get(key))
                seen[key] = (salt, cache_salt)
    assert len(seen) == len(ENGINE_SALTS) * len(REQUEST_SALTS) * 3


def test_salt_none_and_empty_differ():
    tokens = torch.arange(8)
    assert keys_of(make_db(4, salt=None), tokens) != keys_of(make_db(4, salt=""), tokens)
    db = make_db(4)
    assert keys_of(db, tokens, cache_salt=None) != keys_of(db, tokens, cache_salt="")


def test_engine_salt_and_request_salt_are_distinct_slots():
    tokens = torch.arange(8)
    engine_a = keys_of(make_db(4, salt="a"), tokens)
    request_a = keys_of(make_db(4), tokens, cache_salt="a")
    assert set(engine_a).isdisjoint(request_a)
    ab_none = keys_of(make_db(4, salt="ab"), tokens)
    a_b = keys_of(make_db(4, salt="a"), tokens, cache_salt="b")
    assert set(ab_none).isdisjoint(a_b)


def test_same_salt_same_keys():
    tokens = torch.arange(10)
    assert keys_of(make_db(4, salt="t"), tokens, cache_salt="r") == \
        keys_of(make_db(4, salt="t"), tokens, cache_salt="r")


def test_salt_changes_the_keys_of_masked_requests_too():
    tokens = torch.arange(12)
    mask = fft_mask(4, 12)
    db = make_db(4)
    assert set(keys_of(db, tokens, mask, cache_salt="x")).isdisjoint(
        keys_of(db, tokens, mask, cache_salt="y"))
    assert keys_of(db, tokens, mask, cache_salt="x") == keys_of(db, tokens, cache_salt="x")[1:]


salt_text = st.none() | st.text(max_size=12)


@given(a=st.tuples(salt_text, salt_text), b=st.tuples(salt_text, salt_text))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_salt_pairs_property(a, b):
    tokens = [1, 2, 3, 4, 5]
    ka = keys_of(make_db(4, salt=a[0]), tokens, cache_salt=a[1])
    kb = keys_of(make_db(4, salt=b[0]), tokens, cache_salt=b[1])
    if a == b:
        assert ka == kb
    else:
        assert set(ka).isdisjoint(kb)


# ---------------------------------------------------------------------------------------
# Key metadata
# ---------------------------------------------------------------------------------------


def test_keys_carry_the_metadata():
    md = make_metadata("meta-llama/Llama-3-8B", world_size=4, worker_id=3, fmt="vllm")
    db = make_db(4, metadata=md)
    for _, _, key in db.process_tokens(torch.arange(10)):
        assert key.fmt == "vllm"
        assert key.model_name == "meta-llama/Llama-3-8B"
        assert key.world_size == 4
        assert key.worker_id == 3


def test_keys_differ_between_models_and_workers_only_in_metadata():
    tokens = torch.arange(10)
    base = keys_of(make_db(4), tokens)
    others = [
        make_metadata("org/other"),
        make_metadata(world_size=2, worker_id=1),
        make_metadata(world_size=2, worker_id=0),
        make_metadata(fmt="huggingface"),
    ]
    for md in others:
        keys = keys_of(make_db(4, metadata=md), tokens)
        assert [k.chunk_hash for k in keys] == [k.chunk_hash for k in base]
        assert set(keys).isdisjoint(base)
        assert {str(k) for k in keys}.isdisjoint(str(k) for k in base)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [
    torch.arange(8).reshape(2, 4),
    torch.tensor(5),
    np.arange(8).reshape(2, 4),
    [[1, 2], [3, 4]],
])
def test_tokens_must_be_1d(tokens):
    with pytest.raises(ValueError, match="1-D"):
        make_db(4).process_tokens(tokens)


@pytest.mark.parametrize("tokens", [
    torch.tensor([1.0, 2.0]),
    torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
    torch.tensor([True, False]),
    np.array([1.0, 2.0]),
    [1.5, 2.0],
    np.array([True, False]),
])
def test_tokens_must_be_integers(tokens):
    with pytest.raises(ValueError, match="integer"):
        make_db(4).process_tokens(tokens)


@pytest.mark.parametrize("tokens", [
    torch.tensor([1, 2**31], dtype=torch.int64),
    torch.tensor([-(2**31) - 1], dtype=torch.int64),
    np.array([2**31], dtype=np.uint32),
    np.array([2**63], dtype=np.uint64),
    [0, 2**31],
    [-(2**31) - 1],
])
def test_token_ids_outside_int32(tokens):
    with pytest.raises(ValueError, match="int32"):
        make_db(4).process_tokens(tokens)


def test_token_ids_far_outside_int64_are_rejected():
    with pytest.raises(ValueError):
        make_db(4).process_tokens([1, 2**70])


def test_int32_limits_are_accepted():
    keys = keys_of(make_db(4), [-(2**31), 2**31 - 1])
    assert len(keys) == 1


# ---------------------------------------------------------------------------------------
# Options and the registry
# ---------------------------------------------------------------------------------------


def test_create_through_the_registry():
    from lmcache.plugin.registry import registry

    config = LMCacheEngineConfig(chunk_size=4)
    md = make_metadata()
    db = registry.create("token_database", "chunked", {"hash": "blake2b", "salt": "t"},
                         config, md)
    assert isinstance(db, ChunkedTokenDatabase)
    tokens = list(range(10))
    assert db.prefix_hashes(tokens) == reference_hashes(tokens, 4, "blake2b", "t")
    assert keys_of(db, tokens) == keys_of(make_db(4, "blake2b", salt="t"), tokens)


def test_registry_defaults_are_sha256_without_salt():
    from lmcache.plugin.registry import registry

    db = registry.create("token_database", "chunked", {}, LMCacheEngineConfig(chunk_size=4),
                         make_metadata())
    tokens = list(range(10))
    assert db.prefix_hashes(tokens) == reference_hashes(tokens, 4)


@pytest.mark.parametrize("options", [
    {"hsh": "sha256"},
    {"hash": "md5"},
    {"salt": 5},
    {"chunk_size": 4},
])
def test_bad_options_are_refused(options):
    from lmcache.plugin.registry import registry

    with pytest.raises(ValidationError):
        registry.create("token_database", "chunked", options,
                        LMCacheEngineConfig(chunk_size=4), make_metadata())


# ---------------------------------------------------------------------------------------
# CacheEngineKey
# ---------------------------------------------------------------------------------------


def test_key_string_form():
    key = CacheEngineKey("vllm", "model", 4, 2, HEX64)
    assert str(key) == f"vllm@model@4@2@{HEX64}"
    assert key.to_string() == str(key)
    assert CacheEngineKey.from_string(str(key)) == key


def test_key_string_form_of_a_token_database_key():
    key = keys_of(make_db(4), [1, 2, 3])[0]
    fmt, model, world_size, worker_id, chunk_hash = str(key).split("@")
    assert (fmt, world_size, worker_id) == ("vllm", "1", "0")
    assert model != "org/model" and "/" not in model
    assert chunk_hash == reference_hashes([1, 2, 3], 4)[0]
    assert CacheEngineKey.from_string(str(key)) == key


def assert_safe_path_component(key: CacheEngineKey, tmp: Path) -> str:
    s = str(key)
    assert "/" not in s and "\\" not in s and "\x00" not in s
    assert s not in (".", "..")
    assert s.count("@") == 4
    assert CacheEngineKey.from_string(s) == key
    joined = Path(os.path.join(tmp, s)).resolve()
    assert joined.parent == tmp.resolve()
    assert joined.name == s
    return s


NASTY_NAMES = [
    "../x", "org/model", "a@b", "..", ".", "100%", "%2E", "%", "%%41", "a%2Fb",
    "/etc/passwd", "..\\..\\windows", "a\x00b", "模型/名前", "ünïcödé 😀", " ", "~", "-",
    "a b\tc\nd", "...", "./.", "@@@@", "model@1@0@" + HEX64, "+plus+", "?q=1#frag",
]


@pytest.mark.parametrize("model_name", NASTY_NAMES)
def test_key_string_is_a_safe_path_component(model_name, tmp_path):
    key = CacheEngineKey("vllm", model_name, 2, 1, HEX64)
    s = assert_safe_path_component(key, tmp_path)
    path = tmp_path / s
    path.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == [s]
    assert CacheEngineKey.from_string(path.name) == key


def test_distinct_model_names_give_distinct_strings():
    strings = {str(CacheEngineKey("vllm", name, 1, 0, HEX64)) for name in NASTY_NAMES}
    assert len(strings) == len(set(NASTY_NAMES))


@given(model_name=st.text(min_size=1))
@settings(max_examples=300, deadline=None)
def test_key_round_trip_for_any_model_name(model_name, tmp_path_factory):
    assume(_fits(model_name))
    key = CacheEngineKey("vllm", model_name, 8, 7, HEX64)
    assert_safe_path_component(key, tmp_path_factory.getbasetemp())


@given(model_name=st.text(min_size=1, max_size=20),
       world_size=st.integers(1, 1000), data=st.data(),
       chunk_hash=st.one_of(st.text(min_size=1, max_size=40), st.integers()),
       fmt=st.from_regex(r"[A-Za-z0-9_]{1,32}", fullmatch=True))
@settings(max_examples=150, deadline=None)
def test_key_round_trip_all_fields(model_name, world_size, data, chunk_hash, fmt):
    worker_id = data.draw(st.integers(-999_999_999, 999_999_999))
    assume(_fits(model_name))
    assume(not isinstance(chunk_hash, str) or _fits(chunk_hash))
    key = CacheEngineKey(fmt, model_name, world_size, worker_id, chunk_hash)
    s = str(key)
    assert CacheEngineKey.from_string(s) == key
    assert "/" not in s and "\\" not in s and "\x00" not in s


@pytest.mark.parametrize("s", [
    "",
    "vllm",
    "vllm@model@1@0",
    f"vllm@model@1@0@{HEX64}@extra",
    f"vllm@model@x@0@{HEX64}",
    f"vllm@model@1@-0@{HEX64}",  # not canonical
    f"vllm@model@1@01@{HEX64}",
    f"vllm@model@1@1234567890@{HEX64}",  # more than 9 digits
    f"vllm@model@0@0@{HEX64}",  # world_size 0
    "vllm@model@1@0@",  # empty hash
    "vllm@model@1@0@a%2fb",  # not canonical (%2F)
    "vllm@model@1@0@a.b",  # "." is always encoded
    "vllm@model@1@0@a/b",
    f"vllm@@1@0@{HEX64}",  # empty model
    f"@model@1@0@{HEX64}",  # empty fmt
    f"vl/lm@model@1@0@{HEX64}",
    f"vllm@model@1.0@0@{HEX64}",
    f"vllm@model@ 1@0@{HEX64}",
])
def test_from_string_rejects_invalid_strings(s):
    with pytest.raises(ValueError):
        CacheEngineKey.from_string(s)


@pytest.mark.parametrize(("args", "match"), [
    (("vllm", "m", 1, 0, ""), "chunk_hash"),
    (("vllm", "m", 1, 0, None), "chunk_hash"),
    (("vllm", "m", 1, 0, True), "chunk_hash"),
    (("vllm", "m", 1, 0, b"ab"), "chunk_hash"),
    (("vllm", "m", 1, 0, "\ud800"), "chunk_hash"),  # a lone surrogate
    (("vllm", "m", 2, 10**9, HEX64), "worker_id"),
    (("vllm", "m", 2, "1", HEX64), "worker_id"),
    (("vllm", "m", 0, 0, HEX64), "world_size"),
    (("vllm", "m", "1", 0, HEX64), "world_size"),
    (("vllm", "", 1, 0, HEX64), "model_name"),
    (("vl/lm", "m", 1, 0, HEX64), "fmt"),
    (("vl@lm", "m", 1, 0, HEX64), "fmt"),
    (("", "m", 1, 0, HEX64), "fmt"),
])
def test_constructor_rejects_invalid_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        CacheEngineKey(*args)


@pytest.mark.parametrize("chunk_hash", [
    "hash", "chunk_7", HEX64.upper(), "xyz", "ab" * 65, HEX64 + "\n", "a/b", "a@b", ".",
    "..", "%2F", "~", "\u00e9t\u00e9", " ", "-1",
])
def test_any_string_chunk_hash_makes_a_safe_key(chunk_hash, tmp_path):
    # The seed accepted any chunk hash; a third-party token database's hashes need not
    # be lowercase hex. The string form stays one safe file name and parses back.
    key = CacheEngineKey("vllm", "m", 3, 123, chunk_hash)
    assert key.chunk_hash == chunk_hash or len(chunk_hash) > 64
    s = assert_safe_path_component(key, tmp_path)
    (tmp_path / s).write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == [s]


def test_a_long_chunk_hash_is_replaced_by_its_digest():
    long = "x" * 200
    key = CacheEngineKey("vllm", "m", 1, 0, long)
    assert key.chunk_hash == "~" + hashlib.sha256(long.encode()).hexdigest()
    assert key == CacheEngineKey("vllm", "m", 1, 0, long)
    assert key != CacheEngineKey("vllm", "m", 1, 0, "x" * 201)
    assert CacheEngineKey.from_string(str(key)) == key


@pytest.mark.parametrize(("value", "digits"), [(0, "0"), (255, "ff"), (-255, "-ff"),
                                                (2**64 + 1, "10000000000000001")])
def test_an_int_chunk_hash_is_held_as_hex_digits(value, digits):
    key = CacheEngineKey("vllm", "m", 1, 0, value)
    assert key.chunk_hash == digits
    assert key == CacheEngineKey("vllm", "m", 1, 0, digits)  # one key, one string form
    assert str(key) == f"vllm@m@1@0@{digits}"
    assert CacheEngineKey.from_string(str(key)) == key


@pytest.mark.parametrize(("world_size", "worker_id"), [(3, 123), (1, -1), (1, 0),
                                                       (2, 999_999_999)])
def test_seed_worker_ids_make_keys(world_size, worker_id):
    key = CacheEngineKey("vllm", "m", world_size, worker_id, HEX64)
    assert CacheEngineKey.from_string(str(key)) == key


def test_distinct_hashes_give_distinct_strings():
    hashes = ["a/b", "a%2Fb", "a.b", "a%2Eb", "ab", "AB", "~", "%7E"]
    strings = {str(CacheEngineKey("vllm", "m", 1, 0, h)) for h in hashes}
    assert len(strings) == len(hashes)


def test_keys_are_hashable_and_ordered():
    a = CacheEngineKey("vllm", "m", 1, 0, "0" * 64)
    b = CacheEngineKey("vllm", "m", 1, 0, "1" * 64)
    assert len({a, b, CacheEngineKey("vllm", "m", 1, 0, "0" * 64)}) == 2
    assert sorted([b, a]) == [a, b]


# ---------------------------------------------------------------------------------------
# Performance sanity
# ---------------------------------------------------------------------------------------


def test_hashing_a_million_tokens_is_fast():
    db = ChunkedTokenDatabase(LMCacheEngineConfig(chunk_size=256), make_metadata())
    tokens = torch.randint(0, 128_000, (1_000_000,), dtype=torch.int64)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = list(db.process_tokens(tokens))
        best = min(best, time.perf_counter() - t0)
        if best < 1.0:
            break
    assert len(out) == -(-1_000_000 // 256)
    assert best < 1.0, f"hashing 1M tokens took {best:.2f} s"


def _fits(model_name: str) -> bool:
    try:
        return len(_encode_model(model_name)) <= MAX_MODEL_CHARS
    except UnicodeEncodeError:
        return False


def test_model_names_that_are_not_text_are_refused():
    with pytest.raises(ValueError, match="valid Unicode text"):
        CacheEngineKey("vllm", "\ud800", 1, 0, HEX64)


SNAPSHOT = ("/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B-Instruct/"
            "snapshots/0e9e39f249a16976918f6564b8830bc894c89659")


@pytest.mark.parametrize("name", ["\u4e2d" * 11, SNAPSHOT, "x" * 10_000, "/" * 97])
def test_long_model_names_are_shortened_into_a_file_name(name, tmp_path):
    key = CacheEngineKey("vllm", name, 1, 0, HEX64)
    assert len(_encode_model(key.model_name)) <= MAX_MODEL_CHARS
    assert key == CacheEngineKey("vllm", name, 1, 0, HEX64)  # the same name, the same key
    assert CacheEngineKey.from_string(key.to_string()) == key
    (tmp_path / key.to_string()).write_bytes(b"")  # a valid file name
    other = CacheEngineKey("vllm", name + "2", 1, 0, HEX64)
    assert other != key and other.to_string() != key.to_string()


def test_two_snapshot_paths_that_differ_only_early_get_different_keys():
    a = CacheEngineKey("vllm", "/a" + SNAPSHOT, 1, 0, HEX64)
    b = CacheEngineKey("vllm", "/b" + SNAPSHOT, 1, 0, HEX64)
    assert a.model_name.split("~")[0] == b.model_name.split("~")[0]  # the same tail
    assert a != b


@pytest.mark.parametrize("world_size, worker_id", [(True, 0), (1, False)])
def test_bools_are_not_ints_in_keys(world_size, worker_id):
    with pytest.raises(ValueError):
        CacheEngineKey("vllm", "m", world_size, worker_id, HEX64)


@pytest.mark.parametrize("alias", [
    f"vllm@%2e%2e@1@0@{HEX64}", f"vllm@..@1@0@{HEX64}", f"vllm@a/b@1@0@{HEX64}",
    f"vllm@m@01@0@{HEX64}", f"vllm@m@1@00@{HEX64}", f"vllm@m@\u0661@0@{HEX64}",
])
def test_from_string_accepts_only_the_canonical_spelling(alias):
    with pytest.raises(ValueError):
        CacheEngineKey.from_string(alias)
