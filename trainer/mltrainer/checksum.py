"""CRC-32 of a file assembled from pieces that arrive out of order.

A download checks every file against its manifest. sha256 costs 0.6 CPU-s per GB on the hosts
we measured (bench/), and a download is CPU-bound when S3 runs on the same two cores; CRC-32
(zlib's, with hardware help) costs a third of that, and detects what a transfer check is for:
truncation, a wrong object, flipped bits. That is also what S3 itself checks with. The sha256
stays in the manifest as the file's identity, for deduplication.

Ranged downloads finish in any order. Each range takes its own CRC as its bytes arrive (no
second read of the file); ``crc32_combine`` then joins them in file order, as zlib's C function
of that name does (Python's ``zlib`` does not expose it): CRC(A + B) is CRC(A) carried through
``len(B)`` zero bytes, xor CRC(B), and carrying through n zero bytes is a multiplication by
x^(8n) modulo the CRC polynomial.
"""

from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache

_POLY = 0xEDB88320  # CRC-32 (ISO-HDLC), bit-reflected as zlib computes it
_ONE = 1 << 31  # the polynomial 1 (x^0) in reflected bit order


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial, both in reflected bit order."""
    product = 0
    mask = _ONE
    while a:
        if a & mask:
            product ^= b
            a ^= mask
        mask >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _x_pow_2k() -> list[int]:
    """x^(2^k) modulo the polynomial, for k = 0..63."""
    table = [_ONE >> 1]  # x^1
    for _ in range(63):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X_POW_2K = _x_pow_2k()


@lru_cache(maxsize=64)  # a file's ranges have one length, save the last: two entries per file
def _shift_operator(length: int) -> int:
    """x^(8 * length) modulo the polynomial: what appending ``length`` zero bytes multiplies by."""
    result, k, n = _ONE, 3, length  # 8 * length = length << 3
    while n:
        if n & 1:
            result = _multmodp(_X_POW_2K[k], result)
        n >>= 1
        k += 1
    return result


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC-32 of A + B from CRC-32 of A, CRC-32 of B and the length of B."""
    if length_b < 0:
        raise ValueError(f"length_b must be non-negative, got {length_b}")
    return _multmodp(_shift_operator(length_b), crc_a) ^ crc_b


def crc32_hex(crc: int) -> str:
    return f"{crc:08x}"


class Crc32:
    """hashlib-style running CRC-32 (``update`` / ``hexdigest``), for the paths that stream."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return crc32_hex(self.value)


CHECKSUMS = ("crc32", "sha256")  # what a manifest entry can be checked by (``ManifestEntry.check``)


def new_checksum(name: str):
    """A running checksum (``update`` / ``hexdigest``) of one of ``CHECKSUMS``."""
    if name not in CHECKSUMS:
        raise ValueError(f"unknown checksum {name!r} (choose from {', '.join(CHECKSUMS)})")
    return Crc32() if name == "crc32" else hashlib.sha256()
