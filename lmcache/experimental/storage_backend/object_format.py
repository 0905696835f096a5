"""The stored object's format: see `lmcache.kits.object_format` and `lmcache.kits.checksum`."""

from lmcache.kits.object_format import (
    CHECKSUM_ALGORITHMS,
    CHECKSUM_BLOCK,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD_BYTES,
    ObjectHeader,
    PayloadHasher,
    allocate_for,
    build_header,
    decode_header,
    encode_header,
    fill_object,
    payload_checksum,
    read_object,
    verify_payload,
)

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "CHECKSUM_BLOCK",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD_BYTES",
    "ObjectHeader",
    "PayloadHasher",
    "allocate_for",
    "build_header",
    "decode_header",
    "encode_header",
    "fill_object",
    "payload_checksum",
    "read_object",
    "verify_payload",
]
