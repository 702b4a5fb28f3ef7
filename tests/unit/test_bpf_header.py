"""bcc cannot hand bpf/memtrace.h to Python: the constants Python repeats
are checked against the header here, so the two sides never drift."""

from __future__ import annotations

import re
from pathlib import Path

from memtrace.collect import probes, vm

HEADER = (Path(__file__).resolve().parents[2] / "bpf" / "memtrace.h").read_text()


def _enum(name: str) -> list[str]:
    body = re.search(r"enum %s \{(.*?)\};" % name, HEADER, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [m.group(1) for m in re.finditer(r"([A-Z_]+)\s*(?:=\s*\d+)?\s*,", body + ",")]


def _define(name: str) -> int:
    return int(re.search(r"#define %s (\d+)" % name, HEADER).group(1))


def test_counter_indexes():
    names = _enum("counter")
    assert names[-1] == "CNT_MAX"
    for index, name in enumerate(names[:-1]):
        assert getattr(probes, name) == index, name


def test_rss_members():
    names = _enum("rss_member")
    assert names[-1] == "RSS_MEMBERS"
    assert [n.removeprefix("RSS_").lower() for n in names[:-1]] == list(probes.RSS_MEMBERS)


def test_vm_kinds():
    names = _enum("vm_kind")
    kinds = {i + 1: n for i, n in enumerate(names)}  # VM_MMAP = 1, then in order
    for value, kind in vm.VM_KINDS.items():
        assert kinds[value] == "VM_" + kind.upper()
    assert kinds[vm.VM_TRIM] == "VM_TRIM" and kinds[vm.VM_CALLER] == "VM_CALLER"
    assert _define("IN_MALLOC_CALLER_FOLLOWS") == vm.IN_MALLOC_CALLER_FOLLOWS


def test_bucket_shift():
    from memtrace.model.snapshot import BUCKET_SHIFT

    heap = (Path(__file__).resolve().parents[2] / "bpf" / "heap.bpf.c").read_text()
    assert int(re.search(r"#define BUCKET_SHIFT (\d+)", heap).group(1)) == BUCKET_SHIFT


def test_allocator_kinds():
    for kind, value in probes.ALLOCATOR_KINDS.items():
        assert _define(f"ALLOCATOR_{kind.upper()}") == value


def test_jvm_method_tag():
    from memtrace.jvm.methods import JVM_METHOD_TAG

    assert 1 << _define("JVM_METHOD_TAG_BIT") == JVM_METHOD_TAG
    assert _define("JVM_METHOD_SLOT") == 3 * 8  # x86-64: interpreter_frame_method_offset
    assert _define("JVM_SENDER_SP_SLOT") == 1 * 8  # interpreter_frame_sender_sp_offset


def test_jvm_code_limits():
    from memtrace.jvm import codecache

    assert _define("JVM_MAX_FRAME_WORDS") == codecache.MAX_FRAME_WORDS
    assert _define("MAX_JVM_CODE_HEAPS") == codecache.MAX_HEAPS


def test_tgid_limit():
    assert probes.TGID_LIMIT == _define("TGID_LIMIT")


def _struct_fields(name: str) -> list[tuple[str, str, int]]:
    """(C type, field, array length) of a struct of the header."""
    body = re.search(r"struct %s \{(.*?)\};" % name, HEADER, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [(m.group(1), m.group(2), int(m.group(3) or 1))
            for m in re.finditer(r"(\w+)\s+(\w+)(?:\[(\d+)\])?;", body)]


def test_heap_row_layouts():
    """The map rows the reader decodes with struct (probes.HEAP_KEY,
    HEAP_COUNTS) have the header's fields, in its order and sizes."""
    sizes = {"u64": "Q", "s64": "q", "u32": "I"}
    for name, layout, names in (("heap_key", probes.HEAP_KEY, probes.HEAP_KEY_FIELDS),
                                ("heap_counts", probes.HEAP_COUNTS, probes.HEAP_COUNTS_FIELDS)):
        fields = _struct_fields(name)
        assert [f for _, f, _ in fields] == list(names), name
        assert "=" + "".join(sizes[t] * n for t, _, n in fields) == \
            re.sub(r"(\d+)(\w)", lambda m: m.group(2) * int(m.group(1)), layout.format), name
