import threading
import time

from mltrainer.transfer import MAX_PARTS, MiB, PART_SIZE, InFlightLimit, part_ranges


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


def test_part_limit_caps_parts_in_flight_and_raising_it_releases_the_waiting_ones():
    limit = InFlightLimit(1)
    in_flight, most = 0, 0
    count = threading.Lock()
    release = threading.Event()

    def part() -> None:
        nonlocal in_flight, most
        with limit:
            with count:
                in_flight += 1
                most = max(most, in_flight)
            release.wait(5)
            with count:
                in_flight -= 1

    threads = [threading.Thread(target=part) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert (in_flight, most) == (1, 1)  # five wait behind the one allowed
    limit.set(4)
    time.sleep(0.2)
    assert in_flight == 4  # raised while they waited: three more start without any part ending
    release.set()
    for t in threads:
        t.join(5)
    assert (in_flight, most, limit.limit) == (0, 4, 4)


def test_a_proxied_upload_body_goes_out_in_large_blocks_with_its_length(tmp_path):
    """What the GIL fix rests on: urllib3 asks for 16 KiB and gets SEND_SIZE, and requests still
    sends a Content-Length (not chunked) counted from where the file stands, as for a plain file."""
    import requests
    from urllib3.util.request import body_to_chunks

    from mltrainer.transfer import SEND_SIZE, LargeBlocks

    data = bytes(range(256)) * (SEND_SIZE // 128 + 3)  # two full blocks and a part
    path = tmp_path / "optimizer.pt"
    path.write_bytes(data)
    with open(path, "rb") as f:
        chunks = list(body_to_chunks(LargeBlocks(f), method="PUT", blocksize=16384).chunks)
        assert [len(c) for c in chunks] == [SEND_SIZE, SEND_SIZE, len(data) - 2 * SEND_SIZE]
        assert b"".join(chunks) == data
        f.seek(100)
        sent = requests.Request("PUT", "http://127.0.0.1:1/x", data=LargeBlocks(f)).prepare()
        assert sent.headers["Content-Length"] == str(len(data) - 100) and "Transfer-Encoding" not in sent.headers
