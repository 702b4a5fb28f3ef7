"""The compiled BPF object is kept between traces: the second trace loads it
without clang, and a cache file (or directory) that anyone but root could
have written is never loaded: the trace compiles afresh."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

# sort mallocs and prints nothing: the cached programs must count calls too
TRACE = ["--json", "--verbose", "--", "/usr/bin/sort", "/dev/null"]
COMPILED = "compiled, and cached in"
FROM_CACHE = "BPF object from the cache"


def trace(run_memtrace, cache: Path) -> str:
    rc, doc, stderr = run_memtrace(TRACE, env=dict(os.environ, MEMTRACE_CACHE_DIR=str(cache)))
    assert rc == 0, stderr
    assert doc is not None and doc["heap"]["alloc_count"] > 0, stderr
    return stderr


def cached_files(cache: Path) -> list[Path]:
    """The compiled objects (named by their hex key; the probe sites'
    files are sites-KEY.json)."""
    return sorted(cache.glob("[0-9a-f]*.json"))


def test_the_second_trace_loads_the_cached_object(tmp_path, run_memtrace):
    cache = tmp_path / "cache"
    assert COMPILED in trace(run_memtrace, cache)
    (cached,) = cached_files(cache)
    st = cached.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)
    assert stat.S_IMODE(cache.stat().st_mode) & 0o077 == 0
    (sites,) = cache.glob("sites-*.json")
    assert stat.S_IMODE(sites.stat().st_mode) & 0o077 == 0
    second = trace(run_memtrace, cache)
    assert FROM_CACHE in second and COMPILED not in second, second


def _other_owner(path: Path) -> None:
    os.chown(path, 65534, 65534)


def _group_writable(path: Path) -> None:
    path.chmod(0o620)


def _world_writable(path: Path) -> None:
    path.chmod(0o602)


@pytest.mark.parametrize("spoil", [_other_owner, _group_writable, _world_writable],
                         ids=["owned-by-nobody", "group-writable", "world-writable"])
def test_a_cache_file_others_could_write_is_refused_and_replaced(tmp_path, run_memtrace, spoil):
    cache = tmp_path / "cache"
    trace(run_memtrace, cache)
    (cached,) = cached_files(cache)
    spoil(cached)
    refused = trace(run_memtrace, cache)
    assert f"cache file {cached} refused" in refused, refused
    assert COMPILED in refused and FROM_CACHE + " (" not in refused, refused
    # compiled afresh and written anew, by root for root alone
    st = cached.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)
    assert FROM_CACHE in trace(run_memtrace, cache)


def test_a_cache_directory_others_could_write_is_not_used(tmp_path, run_memtrace):
    cache = tmp_path / "cache"
    trace(run_memtrace, cache)
    cache.chmod(0o777)
    said = trace(run_memtrace, cache)
    assert f"cache directory {cache} refused: writable by others" in said, said
    assert FROM_CACHE + " (" not in said, said


def test_a_cache_file_of_another_key_is_refused(tmp_path, run_memtrace):
    cache = tmp_path / "cache"
    trace(run_memtrace, cache)
    (cached,) = cached_files(cache)
    # another object under this one's name (root's own file, still 0600)
    cached.write_text(cached.read_text().replace('"key": "', '"key": "x', 1))
    said = trace(run_memtrace, cache)
    assert "holds another key" in said and COMPILED in said, said
