"""The unwind rows kept between runs (symbols/unwindfile.py, read through
symbols/elf.py): the file format round trip, what makes a file a miss, and
that a damaged or untrusted file is ignored, never trusted."""

from __future__ import annotations

import os
import shutil
from array import array
from pathlib import Path

import pytest

from memtrace import cachefiles
from memtrace.symbols import elf, unwindfile

# A small program of the system's, built without frame pointers.
SAMPLE = Path("/usr/bin/true")
KEY = bytes(range(32))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("MEMTRACE_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """Every .eh_frame parse, by the section's address; each test starts as
    a new run would (nothing read yet in this process)."""
    seen: list[str] = []
    real = elf.unwind_rows

    def counting(data, vaddr, little_endian=True):
        seen.append(hex(vaddr))
        return real(data, vaddr, little_endian)

    monkeypatch.setattr(elf, "unwind_rows", counting)
    elf._unwind_cache.clear()
    yield seen
    elf._unwind_cache.clear()


@pytest.fixture
def sample(tmp_path) -> Path:
    assert SAMPLE.exists(), f"{SAMPLE} is missing"
    copy = tmp_path / "sample"
    shutil.copy2(SAMPLE, copy)
    return copy


def a_new_run() -> None:
    elf._unwind_cache.clear()


def test_a_file_round_trips():
    segments = [(0, 0, 0x1000), (0x1000, 0x1000, 0x5000)]
    addresses = array("Q", [0x1000, 0x1010, 0x2000, 1 << 40])
    steps = array("I", [elf.pack_step(1, 8, 0), elf.pack_step(2, 16, 2), 0, 0xFFFFFFFF])
    data = unwindfile.encode(KEY, segments, addresses, steps, False)
    assert unwindfile.decode(KEY, data) == (segments, addresses, steps, False)
    data = unwindfile.encode(KEY, segments, array("Q"), array("I"), True)
    assert unwindfile.decode(KEY, data) == (segments, array("Q"), array("I"), True)


def test_steps_hold_what_the_rows_said():
    rows = [(0x1000, 1, 8, 0), (0x1004, 2, 0xFFFF, 0xFF), (0x2000, 0, 0, 0)]
    info = elf.UnwindInfo.of_rows([], rows, False)
    assert info.rows == rows


def test_a_damaged_or_foreign_file_is_not_read():
    data = unwindfile.encode(KEY, [(0, 0, 16)], array("Q", [1, 2]), array("I", [3, 4]), False)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    for bad in (b"", data[:10], data[:-1], data + b"\0", bytes(flipped), b"\0" * len(data)):
        assert unwindfile.decode(KEY, bad) is None
    assert unwindfile.decode(bytes(32), data) is None  # made for another file


def test_a_second_run_reads_the_rows_kept_by_the_first(cache, parses, sample):
    first = elf.unwind_info_of(str(sample))
    assert first is not None and len(first.addresses) > 0 and len(parses) == 1
    kept = list(cache.glob("unwind-*.rows"))
    assert len(kept) == 1, kept

    a_new_run()
    assert elf.unwind_info_ready(str(sample))  # read from the cache, not parsed
    again = elf.unwind_info_of(str(sample))
    assert len(parses) == 1
    assert again == first


def test_a_changed_file_is_a_miss(cache, parses, sample):
    first = elf.unwind_info_of(str(sample))
    assert len(parses) == 1
    # A new mtime alone is a new version in memory, whose rows the cache
    # still has (they are named by the bytes they come from).
    st = sample.stat()
    os.utime(sample, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert elf.unwind_info_of(str(sample)) == first
    assert len(parses) == 1
    # Other bytes in .eh_frame are other rows: parsed afresh, never the old ones.
    eh_frame_at = eh_frame_offset(sample)
    data = bytearray(sample.read_bytes())
    data[eh_frame_at + 40] ^= 0x01
    sample.write_bytes(bytes(data))
    a_new_run()
    assert not elf.unwind_info_ready(str(sample))
    elf.unwind_info_of(str(sample))
    assert len(parses) == 2
    assert len(list(cache.glob("unwind-*.rows"))) == 2


def test_a_damaged_cache_file_is_ignored_and_made_again(cache, parses, sample):
    first = elf.unwind_info_of(str(sample))
    (kept,) = cache.glob("unwind-*.rows")
    kept.write_bytes(kept.read_bytes()[:-7] + b"garbage")
    a_new_run()
    assert not elf.unwind_info_ready(str(sample))
    assert elf.unwind_info_of(str(sample)) == first
    assert len(parses) == 2
    a_new_run()
    assert elf.unwind_info_ready(str(sample))  # written whole again
    assert len(parses) == 2


def test_a_cache_file_others_could_write_is_not_read(cache, parses, sample):
    elf.unwind_info_of(str(sample))
    (kept,) = cache.glob("unwind-*.rows")
    kept.chmod(0o666)
    a_new_run()
    assert not elf.unwind_info_ready(str(sample))
    elf.unwind_info_of(str(sample))
    assert len(parses) == 2


def test_the_files_are_kept_within_their_bytes(cache):
    for i in range(5):
        cachefiles.write_trusted(f"unwind-{i}.rows", bytes(1000), budget=("unwind-*.rows", 3500))
        os.utime(cache / f"unwind-{i}.rows", (1000 + i, 1000 + i))  # i used last
    cachefiles.write_trusted("unwind-5.rows", bytes(1000), budget=("unwind-*.rows", 3500))
    assert sorted(p.name for p in cache.glob("unwind-*.rows")) == [
        "unwind-3.rows", "unwind-4.rows", "unwind-5.rows"]


def eh_frame_offset(path: Path) -> int:
    """The file offset of the .eh_frame section's bytes."""
    with open(path, "rb") as f:
        headers = elf._headers(elf._file_reader(f), path.stat().st_size)
    sh = headers[4][b".eh_frame"]
    return sh[4]


def test_the_libraries_an_exec_maps_are_listed_by_our_own_loader():
    from memtrace.process.target import objects_of_image

    listed = objects_of_image(os.getpid())
    assert any(Path(p).name == "libc.so.6" for p in listed), listed
    assert objects_of_image(2**22 + 7) == []  # no such process: nothing run
