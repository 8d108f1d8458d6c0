from mltrainer.transfer import MAX_PARTS, MiB, PART_SIZE, part_ranges


def covers(size: int, ranges: list[tuple[int, int]]) -> bool:
    at = 0
    for offset, length in ranges:
        if offset != at:
            return False
        at += length
    return at == size


def test_parts_cover_the_file_in_order():
    ranges = part_ranges(20 * MiB + 1)
    assert [length for _, length in ranges] == [PART_SIZE, PART_SIZE, 4 * MiB + 1]
    assert covers(20 * MiB + 1, ranges)


def test_empty_file_is_one_empty_part():
    assert part_ranges(0) == [(0, 0)]


def test_parts_grow_to_stay_within_s3s_limit():
    size = 200 * 1024**3  # 200 GiB at 8 MiB would be 25,600 parts
    ranges = part_ranges(size)
    assert len(ranges) <= MAX_PARTS
    assert covers(size, ranges)
