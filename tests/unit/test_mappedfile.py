"""Opening files on a process's behalf: only regular files, only the
inode a mapping names, never blocking, never reading without bound."""

from __future__ import annotations

import os
import threading

import pytest

from memtrace.symbols import elf as elfsyms

from memtrace.process import mappedfile

from memtrace.process import procfs


def _libc_mapping() -> procfs.Mapping:
    return next(m for m in procfs.read_maps(os.getpid()) if "libc.so.6" in m.path)


def _as_path(mapping: procfs.Mapping, path: str) -> procfs.Mapping:
    return procfs.Mapping(0, 0, mapping.perms, mapping.offset, mapping.inode, path,
                          device=mapping.device)  # no map_files entry at 0-0


def _open_in_thread(fn, *args):
    """fn(*args) in a thread: a blocking open would show as a timeout."""
    result = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), f"{fn.__name__} blocked"
    return result


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "shadow", "other-file", "dir"])
def test_a_path_that_now_leads_elsewhere_is_refused(kind, tmp_path):
    mapping = _libc_mapping()
    path = tmp_path / "libc.so.6"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to({"dev-zero": "/dev/zero", "shadow": "/etc/shadow",
                         "other-file": "/bin/sh"}[kind])
    result = _open_in_thread(mappedfile.open_mapped, os.getpid(), _as_path(mapping, str(path)))
    assert isinstance(result.get("error"), mappedfile.NotTheFile), result


def test_the_mapped_file_is_opened_by_its_path_when_the_inode_matches():
    mapping = _libc_mapping()
    fd = mappedfile.open_mapped(os.getpid(), _as_path(mapping, mapping.path))
    try:
        st = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (mapping.device, mapping.inode)
    finally:
        os.close(fd)


def test_map_files_is_the_mapping_itself():
    mapping = _libc_mapping()
    fd = mappedfile.open_mapped(os.getpid(), procfs.Mapping(
        mapping.start, mapping.end, mapping.perms, mapping.offset, mapping.inode,
        "/nonexistent/libc.so.6", device=mapping.device))
    os.close(fd)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_elf_readers_never_open_a_non_regular_file(kind, tmp_path):
    path = tmp_path / "lib.so"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    for reader in (elfsyms.symbols_of, elfsyms.imported_names, elfsyms.ElfSymbols):
        result = _open_in_thread(reader, str(path))
        assert "error" not in result, result
        assert not result["value"] or not getattr(result["value"], "segments", None)


def test_reads_are_bounded(tmp_path):
    big = tmp_path / "big.so"
    with open(big, "wb") as f:
        f.truncate(4096)
    with pytest.raises(OSError, match="limit"):
        mappedfile.read_regular(str(big), limit=1024)
    f, data = mappedfile.read_regular(str(big), limit=4096)
    f.close()
    assert len(data) == 4096


def test_two_names_of_one_file_share_one_parse():
    mapping = _libc_mapping()
    by_path = elfsyms.symbols_of(mapping.path)
    fd = mappedfile.open_path(mapping.path)
    try:
        assert elfsyms.symbols_of(mappedfile.fd_path(fd)) is by_path
    finally:
        os.close(fd)
    assert by_path.find("malloc") is not None
    assert by_path.read(by_path.find("malloc").address, 4)
