import os
import random
import zlib

import pytest
from mltrainer.checksum import Crc32, crc32_combine, crc32_hex


def test_combining_range_crcs_gives_the_crc_of_the_whole():
    rng = random.Random(7)
    data = os.urandom(300_000)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 6)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        crc = 0
        for piece in pieces:
            crc = crc32_combine(crc, zlib.crc32(piece), len(piece))
        assert crc == zlib.crc32(data)


def test_combine_with_empty_and_long_zero_pieces():
    head = b"checkpoint"
    assert crc32_combine(zlib.crc32(head), zlib.crc32(b""), 0) == zlib.crc32(head)
    assert crc32_combine(0, zlib.crc32(head), len(head)) == zlib.crc32(head)
    zeros = bytes(8 << 20)  # a whole 8 MiB range: the length the ranged download combines most
    assert crc32_combine(zlib.crc32(head), zlib.crc32(zeros), len(zeros)) == zlib.crc32(head + zeros)


def test_combine_rejects_a_negative_length():
    with pytest.raises(ValueError, match="length_b must be non-negative"):
        crc32_combine(1, 2, -1)


def test_running_crc_matches_zlib_and_prints_eight_hex_digits():
    running = Crc32()
    for block in (b"", b"\x00", b"abc" * 1000):
        running.update(block)
    assert running.hexdigest() == crc32_hex(zlib.crc32(b"\x00" + b"abc" * 1000))
    assert crc32_hex(0x1F) == "0000001f"
