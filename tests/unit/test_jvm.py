"""The JVM readers that need no JVM: VMStructs tables laid out in a fake
address space, Method* chains, descriptors, NMT summaries, flags."""

from __future__ import annotations

import struct

from memtrace.jvm import diagnostics as diag
from memtrace.jvm.methods import (
    Layout,
    argument_list,
    interpreter_range,
    method_text,
    read_method,
)
from memtrace.jvm.vmstructs import SYMBOLS, VMStructs, c_string, read_vmstructs


class Memory:
    """An address space of one mapping from BASE: bytes placed one after
    the other; reads outside it fail as /proc/PID/mem's do."""

    BASE = 0x10000

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)
        self.used = 0

    def put(self, data: bytes) -> int:
        at = self.used
        self.data[at : at + len(data)] = data
        self.used += (len(data) + 15) // 16 * 16 + 16
        return self.BASE + at

    def string(self, text: str) -> int:
        return self.put(text.encode() + b"\0")

    def read(self, address: int, size: int):
        at = address - self.BASE
        if at < 0 or at + size > len(self.data):
            return None
        return bytes(self.data[at : at + size])


STRUCT_STRIDE, TYPE_STRIDE = 48, 48
# typeName, fieldName, typeString, isStatic, offset, address: HotSpot's own row
STRUCT_COLUMNS = {"TypeName": 0, "FieldName": 8, "IsStatic": 24, "Offset": 32, "Address": 40}
TYPE_COLUMNS = {"TypeName": 0, "Size": 40}


def vm_tables(mem: Memory, fields, types) -> dict[str, int]:
    """Lay out the tables as libjvm.so does; returns the exported symbols."""
    rows = b""
    for type_name, field_name, is_static, value in fields:
        row = bytearray(STRUCT_STRIDE)
        struct.pack_into("<QQ", row, 0, mem.string(type_name), mem.string(field_name))
        struct.pack_into("<i", row, 24, is_static)
        struct.pack_into("<QQ", row, 32, 0 if is_static else value, value if is_static else 0)
        rows += bytes(row)
    structs = mem.put(rows + bytes(STRUCT_STRIDE))
    rows = b""
    for type_name, size in types:
        row = bytearray(TYPE_STRIDE)
        struct.pack_into("<Q", row, 0, mem.string(type_name))
        struct.pack_into("<Q", row, 40, size)
        rows += bytes(row)
    types_at = mem.put(rows + bytes(TYPE_STRIDE))
    values = {"gHotSpotVMStructs": structs, "gHotSpotVMStructEntryArrayStride": STRUCT_STRIDE,
              "gHotSpotVMTypes": types_at, "gHotSpotVMTypeEntryArrayStride": TYPE_STRIDE}
    values.update({f"gHotSpotVMStructEntry{k}Offset": v for k, v in STRUCT_COLUMNS.items()})
    values.update({f"gHotSpotVMTypeEntry{k}Offset": v for k, v in TYPE_COLUMNS.items()})
    assert set(values) == set(SYMBOLS)
    return {name: mem.put(struct.pack("<Q", value)) for name, value in values.items()}


# JDK 17's offsets (x86-64)
JDK17_FIELDS = [
    ("Method", "_constMethod", 0, 8), ("ConstMethod", "_constants", 0, 8),
    ("ConstMethod", "_name_index", 0, 34), ("ConstMethod", "_signature_index", 0, 36),
    ("ConstantPool", "_pool_holder", 0, 24), ("ConstantPool", "_length", 0, 64),
    ("Klass", "_name", 0, 24), ("Symbol", "_length", 0, 4), ("Symbol", "_body", 0, 6),
    ("StubQueue", "_stub_buffer", 0, 8), ("StubQueue", "_buffer_limit", 0, 20),
]
POOL_SIZE = 72


def jdk17(mem: Memory, interpreter_code: int = 0) -> VMStructs:
    fields = JDK17_FIELDS + [("AbstractInterpreter", "_code", 1, interpreter_code)]
    found = read_vmstructs(mem.read, vm_tables(mem, fields, [("ConstantPool", POOL_SIZE),
                                                             ("Method", 88)]))
    assert found is not None
    return found


def test_tables_read_by_their_exported_layout():
    mem = Memory()
    structs = jdk17(mem, interpreter_code=0x7000_1234)
    assert structs.offsets[("ConstMethod", "_name_index")] == 34
    assert structs.offsets[("Symbol", "_body")] == 6
    assert structs.addresses[("AbstractInterpreter", "_code")] == 0x7000_1234
    assert ("AbstractInterpreter", "_code") not in structs.offsets
    assert structs.sizes == {"ConstantPool": POOL_SIZE, "Method": 88}


def test_tables_not_written_yet_or_missing_read_as_none():
    mem = Memory()
    symbols = vm_tables(mem, JDK17_FIELDS, [("ConstantPool", POOL_SIZE)])
    assert read_vmstructs(mem.read, {k: v for k, v in symbols.items() if k != "gHotSpotVMTypes"}) is None
    assert read_vmstructs(lambda a, n: None, symbols) is None
    zeroed = Memory()
    assert read_vmstructs(zeroed.read, {name: zeroed.put(bytes(8)) for name in SYMBOLS}) is None


def test_strings_are_bounded():
    mem = Memory()
    assert c_string(mem.read, mem.string("Klass")) == "Klass"
    assert c_string(mem.read, mem.put(b"x" * 600)) is None  # no end within the limit
    mem.data[-3:] = b"abc"
    assert c_string(mem.read, Memory.BASE + len(mem.data) - 3) is None  # the mapping's end
    assert c_string(mem.read, 0) is None


def symbol(mem: Memory, text: str) -> int:
    return mem.put(struct.pack("<IH", 1, len(text)) + text.encode())


def method(mem: Memory, klass: str, name: str, signature: str) -> int:
    """A Method with its ConstMethod, ConstantPool (name at 5, signature
    at 6) and holder Klass, at JDK 17's offsets."""
    holder = bytearray(32)
    struct.pack_into("<Q", holder, 24, symbol(mem, klass))
    pool = bytearray(POOL_SIZE + 8 * 8)
    struct.pack_into("<Q", pool, 24, mem.put(bytes(holder)))
    struct.pack_into("<i", pool, 64, 8)
    struct.pack_into("<QQ", pool, POOL_SIZE + 5 * 8, symbol(mem, name), symbol(mem, signature))
    const = bytearray(40)
    struct.pack_into("<Q", const, 8, mem.put(bytes(pool)))
    struct.pack_into("<HH", const, 34, 5, 6)
    return mem.put(struct.pack("<QQ", 0, mem.put(bytes(const))))


def test_a_method_is_named_from_its_chain():
    mem = Memory()
    layout = Layout(jdk17(mem))
    m = method(mem, "Inflate$Worker", "inflateOne", "()Ljava/util/zip/Inflater;")
    assert read_method(mem.read, layout, m) == "Inflate$Worker.inflateOne()"
    m = method(mem, "java/util/zip/Inflater", "<init>", "(Z)V")
    assert read_method(mem.read, layout, m) == "java.util.zip.Inflater.<init>(boolean)"


def test_what_is_no_method_is_not_named():
    mem = Memory()
    layout = Layout(jdk17(mem))
    assert read_method(mem.read, layout, 0x5555_0000_0000) is None  # unmapped
    garbage = mem.put(struct.pack("<QQ", 0, mem.put(bytes(40))))  # a null pool
    assert read_method(mem.read, layout, garbage) is None
    m = method(mem, "A", "has space", "()V")  # not a Symbol's text
    assert read_method(mem.read, layout, m) is None


def test_layout_names_what_a_jvm_lacks():
    mem = Memory()
    structs = jdk17(mem)
    del structs.offsets[("Symbol", "_body")]
    try:
        Layout(structs)
    except ValueError as e:
        assert "Symbol::_body" in str(e)
    else:
        raise AssertionError("a layout without Symbol::_body")


def test_interpreter_range_from_its_stub_queue():
    mem = Memory()
    queue = bytearray(24)
    struct.pack_into("<Q", queue, 8, 0x7F00_0000_0000)
    struct.pack_into("<i", queue, 20, 0x2_0000)
    code = mem.put(struct.pack("<Q", mem.put(bytes(queue))))
    layout = Layout(jdk17(mem, interpreter_code=code))
    assert interpreter_range(mem.read, layout) == (0x7F00_0000_0000, 0x7F00_0002_0000)
    not_yet = Layout(jdk17(mem, interpreter_code=mem.put(bytes(8))))
    assert interpreter_range(mem.read, not_yet) is None


def test_descriptors_read_as_the_perf_map_spells_them():
    assert argument_list("()V") == "()"
    assert argument_list("(Z[BI[[Ljava/lang/String;J)V") == \
        "(boolean, byte[], int, java.lang.String[][], long)"
    assert argument_list("(Q)V") == "" and argument_list("(L;") == "" and argument_list("") == ""
    assert method_text("a/B$C", "run", "()V") == "a.B$C.run()"
    assert method_text("Foo$$Lambda$5+0x00007f13f1002800", "run", "()V") == \
        "Foo$$Lambda$5/0x00007f13f1002800.run()"  # a hidden class, as the perf map spells it


NMT_17 = """12345:

Native Memory Tracking:

Total: reserved=8027649244, committed=484250844
       malloc: 7279836 #3843
       mmap:   reserved=8020369408, committed=476971008

-                     Class (reserved=1073815239, committed=204487)
                            (malloc=73415 #524) (at peak)
"""


def test_nmt_summary_malloc_total():
    assert diag.parse_nmt_summary(NMT_17) == diag.NmtSummary(7279836, 3843)
    older = NMT_17.replace("       malloc: 7279836 #3843\n", "") + \
        "-  Thread (reserved=1, committed=1)\n    (malloc=1000 #10)\n"
    assert diag.parse_nmt_summary(older) == diag.NmtSummary(74415, 534)
    assert diag.parse_nmt_summary("12345:\nNative memory tracking is not enabled\n") is None
    assert diag.parse_nmt_summary("garbage") is None


def launch_flag(cmdline, environ, name):
    return bool(diag.flag_in(diag.launch_words(cmdline, environ), name))


def test_frame_pointer_flag_where_the_jvm_reads_it():
    flag = diag.FRAME_POINTER_FLAG
    assert launch_flag(["java", "-XX:+PreserveFramePointer", "Main"], {}, flag)
    assert not launch_flag(["java", "Main"], {}, flag)
    assert launch_flag(["java", "Main"], {"JAVA_TOOL_OPTIONS": "-Xmx1g -XX:+PreserveFramePointer"}, flag)
    # the command line comes after JAVA_TOOL_OPTIONS, _JAVA_OPTIONS after both
    assert not launch_flag(["java", "-XX:-PreserveFramePointer"],
                                {"JAVA_TOOL_OPTIONS": "-XX:+PreserveFramePointer"}, flag)
    assert launch_flag(["java", "-XX:-PreserveFramePointer"],
                            {"_JAVA_OPTIONS": "-XX:+PreserveFramePointer"}, flag)
    assert diag.vm_flags_flag("123:\n-XX:CICompilerCount=2 -XX:+PreserveFramePointer -XX:+UseG1GC", flag)
    assert not diag.vm_flags_flag("123:\n-XX:CICompilerCount=2 -XX:+UseG1GC", flag)


def jvm_snapshot(**jvm):
    from memtrace.model.snapshot import Counters, HeapTotals, JvmStats, Snapshot

    heap = HeapTotals(counters=Counters(alloc_bytes=15 << 20, free_bytes=1 << 20, alloc_count=9,
                                        free_count=1), live_before_trace_bytes=1 << 20)
    return Snapshot(pid=1, comm="java", elapsed_s=1.0, heap=heap, jvm=JvmStats(**jvm))


def test_nmt_beside_heap_live_in_json_text_and_recordings():
    import json

    from memtrace.record.codec import snapshot_from_json
    from memtrace.output.reports.text import render_summary

    s = jvm_snapshot(preserve_frame_pointer=True, interpreter_found=True, compiled_frames_walked=True,
                     nmt_malloc_bytes=3 << 20, nmt_malloc_count=9052, nmt_elapsed_s=0.5)
    d = s.to_json()
    assert d["jvm"]["heap_live_bytes"] == 15 << 20  # 14 MiB traced, 1 MiB from before the attach
    assert d["jvm"]["not_seen_by_nmt_bytes"] == 12 << 20
    assert snapshot_from_json(json.loads(json.dumps(d))).to_json() == d
    lines = render_summary(s).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("JVM native memory tracking"))
    assert lines[at] == ("JVM native memory tracking: malloc 3.0 MiB in 9,052 blocks; heap live "
                         "15.0 MiB (with an estimate of the blocks from before the attach)"), lines
    assert lines[at + 1].startswith("  not seen by NMT: 12.0 MiB"), lines
    off = jvm_snapshot(preserve_frame_pointer=True)
    assert "JVM native memory" not in render_summary(off)
    assert "not_seen_by_nmt_bytes" not in off.to_json()["jvm"]


def test_frame_pointer_hint_only_when_the_flag_is_known_off():
    from memtrace.model.accounting import jvm_hints
    from memtrace.model.snapshot import JvmStats

    assert jvm_hints(None) == () and jvm_hints(JvmStats()) == ()
    assert jvm_hints(JvmStats(preserve_frame_pointer=True)) == ()
    (hint,) = jvm_hints(JvmStats(preserve_frame_pointer=False))
    from memtrace.output.notes import note_text

    assert note_text(hint).count("-XX:+PreserveFramePointer") == 1


def test_what_only_jcmd_can_tell():
    words = diag.launch_words(["java", "-XX:NativeMemoryTracking=summary", "Main"],
                              {"JAVA_TOOL_OPTIONS": "-XX:NativeMemoryTracking=detail"})
    assert diag.option_value(words, "NativeMemoryTracking") == "summary"
    assert diag.option_value(["java", "Main"], "NativeMemoryTracking") is None
    assert not diag.options_elsewhere(words)
    assert diag.options_elsewhere(["java", "@app.args", "Main"])
    assert diag.options_elsewhere(["java", "-XX:Flags=.hotspotrc", "Main"])


def test_tagged_frames_are_named_as_interpreted_methods():
    from memtrace.jvm.methods import JVM_METHOD_TAG
    from memtrace.symbols.symbolizer import Symbolizer

    class Methods:
        names = {0x7F00_1000: "Inflate$Worker.run()"}

        def name(self, method):
            return self.names.get(method)

    symbols = Symbolizer(2 ** 22 + 1)  # no such process
    assert not symbols.is_code(JVM_METHOD_TAG | 0x7F00_1000)  # not a JVM: never a frame
    symbols.java = Methods()
    assert symbols.is_code(JVM_METHOD_TAG | 0x7F00_1000)
    assert symbols.frame(JVM_METHOD_TAG | 0x7F00_1000) == "Inflate$Worker.run() [Interpreter]"
    assert symbols.frame(JVM_METHOD_TAG | 0x7F00_2000) == "Method* 0x7f002000 [Interpreter]"


# ---------------------------------------------------------------- code cache

CODE_OFFSETS = {
    ("GrowableArrayBase", "_len"): 0, ("GrowableArray<int>", "_data"): 8,
    ("CodeHeap", "_memory"): 8, ("CodeHeap", "_segmap"): 120,
    ("CodeHeap", "_log2_segment_size"): 256,
    ("VirtualSpace", "_low_boundary"): 0, ("VirtualSpace", "_high_boundary"): 8,
    ("HeapBlock", "_header"): 0, ("HeapBlock::Header", "_used"): 8,
    ("CodeBlob", "_data_offset"): 24, ("CodeBlob", "_frame_size"): 28,
    ("CodeBlob", "_content_begin"): 48,
}


def code_heap(mem: Memory, low: int, high: int, segmap: int, log2: int = 6) -> int:
    """A CodeHeap's header: its VirtualSpaces and segment size."""
    header = bytearray(344)
    struct.pack_into("<QQ", header, 8, low, high)
    struct.pack_into("<Q", header, 120, segmap)
    struct.pack_into("<i", header, 256, log2)
    return mem.put(bytes(header))


def code_cache(mem: Memory, heaps) -> VMStructs:
    data = mem.put(struct.pack(f"<{len(heaps)}Q", *heaps))
    array = mem.put(struct.pack("<iiQ", len(heaps), len(heaps), data))
    heaps_var = mem.put(struct.pack("<Q", array))
    return VMStructs(offsets=dict(CODE_OFFSETS), addresses={("CodeCache", "_heaps"): heaps_var},
                     sizes={"HeapBlock": 16})


def test_code_heaps_and_what_the_walk_reads_of_a_blob():
    from memtrace.jvm import codecache

    mem = Memory()
    heaps = [code_heap(mem, 0x7F0000000000, 0x7F0000500000, 0x7E0000000000),
             code_heap(mem, 0x7F0000500000, 0x7F0007A00000, 0x7E0000100000, 7)]
    layout = codecache.Layout(code_cache(mem, heaps))
    assert codecache.read_code_heaps(mem.read, layout) == (
        codecache.CodeHeap(0x7F0000000000, 0x7F0000500000, 0x7E0000000000, 6),
        codecache.CodeHeap(0x7F0000500000, 0x7F0007A00000, 0x7E0000100000, 7))
    assert layout.walk_fields() == {"block_header": 16, "used_at": 8, "frame_size_at": 28,
                                    "data_offset_at": 24, "content_begin_at": 48}


def test_code_heaps_that_do_not_hold_together_are_not_given_to_the_walk():
    from memtrace.jvm import codecache

    mem = Memory()
    overlapping = [code_heap(mem, 0x7F0000000000, 0x7F0000500000, 0x7E0000000000),
                   code_heap(mem, 0x7F0000400000, 0x7F0000600000, 0x7E0000100000)]
    odd_segment = [code_heap(mem, 0x7F0000000000, 0x7F0000500000, 0x7E0000000000, 40)]
    for heaps in (overlapping, odd_segment):
        assert codecache.read_code_heaps(mem.read, codecache.Layout(code_cache(mem, heaps))) is None
    # no code cache yet (the JVM starting), or a heap count no JVM has
    structs = code_cache(mem, [])
    structs.addresses[("CodeCache", "_heaps")] = mem.put(struct.pack("<Q", 0))
    assert codecache.read_code_heaps(mem.read, codecache.Layout(structs)) is None
    array = mem.put(struct.pack("<iiQ", 1000, 1000, 0x20000))
    structs.addresses[("CodeCache", "_heaps")] = mem.put(struct.pack("<Q", array))
    assert codecache.read_code_heaps(mem.read, codecache.Layout(structs)) is None


def test_code_cache_layout_names_what_a_jvm_lacks():
    import pytest

    from memtrace.jvm import codecache

    offsets = dict(CODE_OFFSETS)
    del offsets[("CodeBlob", "_frame_size")]
    with pytest.raises(ValueError, match=r"CodeBlob::_frame_size, CodeCache::_heaps"):
        codecache.Layout(VMStructs(offsets=offsets, sizes={"HeapBlock": 16}))


def test_frame_pointer_hint_not_given_once_compiled_frames_are_walked():
    from memtrace.model.accounting import jvm_hints
    from memtrace.model.snapshot import JvmStats

    assert jvm_hints(JvmStats(preserve_frame_pointer=False, compiled_frames_walked=True)) == ()


def test_perf_map_keeps_the_names_of_freed_code():
    from memtrace.jvm.perfmap import with_freed_code

    old = [(0x1000, 0x1100, "A.c1()"), (0x2000, 0x2100, "B.c1()"), (0x3000, 0x3100, "C.x()")]
    new = [(0x1080, 0x1200, "D.new()"), (0x3000, 0x3100, "C.x()"), (0x4000, 0x4100, "A.c2()")]
    # A's first code now holds D's: only B's, freed and not reused, is kept.
    assert with_freed_code(new, old) == [(0x1080, 0x1200, "D.new()"), (0x2000, 0x2100, "B.c1()"),
                                         (0x3000, 0x3100, "C.x()"), (0x4000, 0x4100, "A.c2()")]
    assert with_freed_code(new, []) == new


# ---------------------------------------------------------------- code blobs

BLOB_OFFSETS = {("CodeBlob", "_name"): 96, ("CompiledMethod", "_method"): 112,
                ("CodeBlob", "_code_begin"): 32}


def blob_layout(mem: Memory, heaps, offsets=BLOB_OFFSETS):
    from memtrace.jvm import codeblobs, codecache

    structs = code_cache(mem, heaps)
    structs.offsets.update(offsets)
    return codeblobs.Layout(structs, codecache.Layout(structs))


class Heap:
    """A code heap of 64-byte segments in the fake memory, its segment map
    marked as HotSpot marks it (0 at a block's first segment, then the
    distance back, in hops of at most 0xFE; 0xFF: free)."""

    LOG2 = 6

    def __init__(self, mem: Memory, segments: int) -> None:
        self.mem = mem
        self.lo = mem.put(bytes(segments << self.LOG2))
        self.segmap = mem.put(b"\xff" * segments)
        from memtrace.jvm.codecache import CodeHeap
        self.heap = CodeHeap(self.lo, self.lo + (segments << self.LOG2), self.segmap, self.LOG2)

    def block(self, first: int, count: int, used: bool = True) -> int:
        at = self.segmap - Memory.BASE + first
        for i in range(count):
            self.mem.data[at + i] = min(i, 0xFE) if i < 0xFF else 0xFE
        block = self.lo + (first << self.LOG2)
        self.mem.data[block - Memory.BASE + 8] = int(used)  # HeapBlock::Header::_used
        return block

    def blob(self, block: int, name: str, method: int = 0, code_at: int = 0x100,
             data_offset: int = 0x800) -> int:
        blob = block + 16
        header = bytearray(120)
        struct.pack_into("<i", header, 24, data_offset)
        struct.pack_into("<Q", header, 32, blob + code_at)
        struct.pack_into("<Q", header, 96, self.mem.string(name))
        struct.pack_into("<Q", header, 112, method)
        self.mem.data[blob - Memory.BASE : blob - Memory.BASE + 120] = header
        return blob


def test_the_blob_at_a_pc_is_found_back_through_the_segment_map():
    from memtrace.jvm.codeblobs import Blob, blob_at

    mem = Memory(4 << 20)
    heap = Heap(mem, 2048)
    layout = blob_layout(mem, [code_heap(mem, heap.heap.lo, heap.heap.hi, heap.segmap)])
    m = method(mem, "java/util/zip/Inflater", "init", "(Z)J")
    block = heap.block(10, 600)  # more than 0xFE segments: hops
    blob = heap.blob(block, "nmethod", m, data_offset=600 * 64 - 16)
    pc = block + 599 * 64 + 3
    assert blob_at(mem.read, [heap.heap], layout, pc) == Blob(blob, "nmethod", m, blob + 0x100)
    assert read_method(mem.read, Layout(jdk17(mem)), m) == "java.util.zip.Inflater.init(boolean)"
    stub = heap.blob(heap.block(700, 8), "StubRoutines (1)", method=0x1234, data_offset=0x180)
    assert blob_at(mem.read, [heap.heap], layout, stub + 0x100) == Blob(stub, "StubRoutines (1)", 0,
                                                                         stub + 0x100)


def test_what_is_no_live_blob_is_not_named():
    from memtrace.jvm.codeblobs import blob_at

    mem = Memory(4 << 20)
    heap = Heap(mem, 1024)
    layout = blob_layout(mem, [code_heap(mem, heap.heap.lo, heap.heap.hi, heap.segmap)])
    heaps = [heap.heap]
    freed = heap.blob(heap.block(0, 32, used=False), "nmethod", 0x4000)
    assert blob_at(mem.read, heaps, layout, freed + 0x200) is None  # a free block
    assert blob_at(mem.read, heaps, layout, heap.lo + 100 * 64) is None  # never used: 0xFF
    live = heap.blob(heap.block(40, 32), "nmethod", 0x4000)
    assert blob_at(mem.read, heaps, layout, live + 0x80) is None  # before the code
    assert blob_at(mem.read, heaps, layout, live + 0x900) is None  # in the data
    assert blob_at(mem.read, heaps, layout, heap.heap.hi + 8) is None  # in no heap
    odd = heap.blob(heap.block(80, 32), "nmethod\x01", 0x4000)
    assert blob_at(mem.read, heaps, layout, odd + 0x200) is None  # no name
    mem.data[heap.segmap - Memory.BASE + 44] = 0xFF  # a free mark in the block's chain
    mem.data[heap.segmap - Memory.BASE + 45] = 1
    assert blob_at(mem.read, heaps, layout, heap.lo + 45 * 64) is None
    mem.data[heap.segmap - Memory.BASE + 45] = 50  # a hop back past the heap's start
    assert blob_at(mem.read, heaps, layout, heap.lo + 45 * 64) is None


def test_blob_layout_of_later_jdks_and_what_a_jvm_lacks():
    import pytest

    from memtrace.jvm.codeblobs import Blob, blob_at

    mem = Memory(1 << 20)
    heap = Heap(mem, 64)
    jdk25 = {("CodeBlob", "_name"): 96, ("nmethod", "_method"): 112, ("CodeBlob", "_code_offset"): 32}
    layout = blob_layout(mem, [code_heap(mem, heap.heap.lo, heap.heap.hi, heap.segmap)], jdk25)
    block = heap.block(2, 40)
    blob = block + 16
    header = bytearray(120)
    struct.pack_into("<ii", header, 24, 0x800, 0)
    struct.pack_into("<i", header, 32, 0x180)  # an offset from the blob
    struct.pack_into("<Q", header, 96, mem.string("nmethod"))
    struct.pack_into("<Q", header, 112, 0x7000)
    mem.data[blob - Memory.BASE : blob - Memory.BASE + 120] = header
    assert blob_at(mem.read, [heap.heap], layout, blob + 0x200) == Blob(blob, "nmethod", 0x7000,
                                                                         blob + 0x180)
    with pytest.raises(ValueError, match=r"CodeBlob::_name, nmethod::_method, CodeBlob::_code_begin"):
        blob_layout(mem, [code_heap(mem, heap.heap.lo, heap.heap.hi, heap.segmap)], {})


class CompiledCode:
    """JavaMethods as the symbolizer sees it, over a code heap whose
    content the test changes."""

    blob_layout = object()

    def __init__(self) -> None:
        self.at: dict[int, tuple] = {}

    def compiled_code(self, pc):
        return self.at.get(pc)

    def batch(self):
        import contextlib
        return contextlib.nullcontext()


class NoPerfMap:
    def __init__(self, names=()) -> None:
        self.names = dict(names)
        self.asked = 0

    def lookup(self, addr):
        return self.names.get(addr)

    def want_refresh(self):
        self.asked += 1

    def tick(self):
        pass

    def take_update(self):
        return False


def test_jit_frames_named_from_the_code_heap_as_it_is_now():
    from memtrace.symbols.symbolizer import Symbolizer

    symbols = Symbolizer(2 ** 22 + 1)  # no such process: every address is generated code
    symbols._refreshed_this_round = True
    code = symbols.java = CompiledCode()
    perf = symbols.perf_map = NoPerfMap({0x9000: ("Old.perfMap()", 0x10)})
    pc = 0x7F00_0000_1234
    code.at[pc] = ("java.util.zip.Inflater.init(boolean)", 0x4C)
    assert symbols.frames([pc]) == ("java.util.zip.Inflater.init(boolean)+0x4c [JIT]",)
    # C1's code freed, C2's compiled at the same address: named anew, from
    # the next snapshot on (one snapshot's stacks read the heap once)
    code.at[pc] = ("Inflate$Worker.inflateOne()", 0x4C)
    assert symbols.frame(pc) == "java.util.zip.Inflater.init(boolean)+0x4c [JIT]"
    symbols.new_round()
    assert symbols.frame(pc) == "Inflate$Worker.inflateOne()+0x4c [JIT]"
    # freed since, or the JVM gone: the last code the heap showed there
    del code.at[pc]
    symbols.new_round()
    assert symbols.frame(pc) == "Inflate$Worker.inflateOne()+0x4c [JIT]"
    # a blob that does not hold together: the perf map, else unnamed
    code.at[0x9000] = code.at[0xA000] = (None, 0x10)
    assert symbols.frame(0x9000) == "Old.perfMap()+0x10 [JIT]"
    assert symbols.frame(0xA000) == "0xa000 [JIT]"
    assert perf.asked == 3  # once per new address: the fallback kept fresh


def test_stacks_keep_their_names_unless_a_frame_was_provisional():
    from memtrace.symbols.symbolizer import Symbolizer

    class Map(NoPerfMap):
        updated = False

        def take_update(self):
            updated, self.updated = self.updated, False
            return updated

    symbols = Symbolizer(2 ** 22 + 1)
    symbols._refreshed_this_round = True
    code = symbols.java = CompiledCode()
    perf = symbols.perf_map = Map()
    code.at[0x1000] = ("A.a()", 4)
    first = symbols.frames([0x1000, 0x2000])
    assert first == ("A.a()+0x4 [JIT]", "0x2000 [JIT]")
    perf.updated = True
    perf.names[0x2000] = ("B.b()", 8)
    symbols.new_round()
    assert symbols.generation == 1 and symbols.stale_frames == {"0x2000 [JIT]"}
    assert symbols.frame(0x2000) == "B.b()+0x8 [JIT]"
    perf.updated = True
    symbols.new_round()  # nothing provisional: nothing to name again
    assert symbols.generation == 1


class WalkProbes:
    """What the JVM watch tells the frame walk (bpf/jvm.bpf.c's maps)."""

    def __init__(self) -> None:
        self.interpreter = None
        self.code = None

    def set_jvm_interpreter(self, start, end):
        self.interpreter = (start, end)

    def set_jvm_code(self, heaps, fields, generation):
        self.code = (tuple(heaps), generation)


def test_an_exec_leaves_nothing_of_the_old_jvm_to_the_walk_or_the_names():
    from types import SimpleNamespace

    from memtrace.collect.collector import Collector
    from memtrace.collect.jvm_watch import JvmWatch
    from memtrace.jvm.codecache import CodeHeap
    from memtrace.symbols.symbolizer import Symbolizer

    class Java:
        hotspot = False
        code_layout = SimpleNamespace(walk_fields=lambda: {"block_header": 16})
        blob_layout = object()

        def interpreter(self):
            return (0x7000, 0x8000)

        def code_heaps(self):
            return (CodeHeap(0x9000, 0xA000, 0x5000, 6),)

        def compiled_code(self, pc):
            return ("Old.jvm()", 4)

    probes = WalkProbes()
    symbols = Symbolizer(2 ** 22 + 1)
    symbols._refreshed_this_round = True
    symbols.java, symbols.perf_map = Java(), NoPerfMap()
    watch = JvmWatch(symbols, probes, 0.0)
    watch.tick()
    assert probes.interpreter == (0x7000, 0x8000) and probes.code[0][0].lo == 0x9000
    assert symbols.frame(0x9100) == "Old.jvm()+0x4 [JIT]"

    collector = object.__new__(Collector)  # only what an exec's news touches
    collector.pid, collector.comm, collector._execs = 2 ** 22 + 1, "java", []
    collector.probes = SimpleNamespace(unwind=None)
    collector.symbols, collector.jvm = symbols, watch
    collector._seed = lambda exec_ns=None: None
    collector._walks = SimpleNamespace(reset=lambda: None)
    collector.watch = SimpleNamespace(read=lambda: [SimpleNamespace(kind="exec", ts_ns=1,
                                                                    argv=["/bin/true"])])
    collector.read_watch()
    # The walk no longer takes any frame for the interpreter's or compiled
    # code's (the interpreter's range is what turns both on), its heaps are
    # gone, and the old JVM names nothing.
    assert probes.interpreter == (0, 0)
    assert probes.code[0] == () and probes.code[1] == 2
    assert watch.interpreter is None and watch.code_heaps is None
    assert symbols.java is None and symbols.perf_map is None
    assert symbols.frame(0x9100) == "0x9100"
    watch.tick()  # not a JVM now: nothing set again
    assert probes.interpreter == (0, 0)


def test_a_batch_of_reads_opens_the_memory_once_and_closes_it():
    import os

    from memtrace.jvm.methods import JavaMethods

    java = JavaMethods(os.getpid(), None)
    fds = len(os.listdir("/proc/self/fd"))
    data = b"read from outside"
    with java.batch():
        assert len(os.listdir("/proc/self/fd")) == fds  # opened at the first read only
        with java._memory() as read:
            first = read
            assert read(id(data), 8) is not None
        with java._memory() as read:
            assert read is first
        assert len(os.listdir("/proc/self/fd")) == fds + 1
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_method_freed_and_reused_is_named_anew():
    from memtrace.jvm.methods import JavaMethods

    mem = Memory()
    java = JavaMethods(2 ** 22 + 1, None)
    java.layout = Layout(jdk17(mem))
    java._read = mem.read  # as inside a batch
    m = method(mem, "A", "old", "()V")
    assert java.name(m) == "A.old()"
    # Its class unloaded, the Method's memory holds another method now
    other = method(mem, "B", "new", "(I)V")
    at = m - Memory.BASE
    mem.data[at : at + 16] = mem.data[other - Memory.BASE : other - Memory.BASE + 16]
    assert java.name(m) == "B.new(int)"
    assert java.name(m) == "B.new(int)"


def test_compiled_code_kept_by_pc_only_while_its_blob_is_there():
    from memtrace.jvm import codecache
    from memtrace.jvm.methods import JavaMethods

    mem = Memory(4 << 20)
    heap = Heap(mem, 1024)
    java = JavaMethods(2 ** 22 + 1, None)
    java.layout = Layout(jdk17(mem))
    java.blob_layout = blob_layout(mem, [code_heap(mem, heap.heap.lo, heap.heap.hi, heap.segmap)])
    java.code_layout, java._heaps = java.blob_layout.heaps, (heap.heap,)
    java._read = mem.read  # as inside a batch
    c1 = method(mem, "java/util/zip/Inflater", "init", "(Z)J")
    block = heap.block(8, 40)
    blob = heap.blob(block, "nmethod", c1)
    pc = blob + 0x14C
    assert java.compiled_code(pc) == ("java.util.zip.Inflater.init(boolean)", 0x4C)
    assert java.compiled_code(pc) == ("java.util.zip.Inflater.init(boolean)", 0x4C)  # kept
    # Freed, then the same block holds another method's code
    mem.data[block - Memory.BASE + 8] = 0
    assert java.compiled_code(pc) is None
    mem.data[block - Memory.BASE + 8] = 1
    heap.blob(block, "nmethod", method(mem, "Inflate$Worker", "inflateOne", "()V"), code_at=0x120)
    assert java.compiled_code(pc) == ("Inflate$Worker.inflateOne()", 0x2C)
    # A block that starts before: the kept block's header is gone
    heap.blob(heap.block(4, 44), "StubRoutines (1)", data_offset=0x900)
    assert java.compiled_code(pc) == ("StubRoutines (1)", pc - (heap.lo + 4 * 64 + 16 + 0x100))
    # An nmethod whose Method* is no pointer: there, but not named
    heap.blob(heap.block(4, 44), "nmethod", 0x1235, data_offset=0x900)
    assert java.compiled_code(pc) == (None, pc - (heap.lo + 4 * 64 + 16 + 0x100))


def test_compiled_code_of_a_real_jdk17_named_from_recorded_reads():
    """The reads that named three pcs of a live JVM (OpenJDK 17.0.15,
    Debian 12, tests/programs/Inflate.java after its warm-up), recorded
    with the offsets its VMStructs gave: a native method's wrapper, a C2
    nmethod and the call stub, each as its perf map named it."""
    import json
    from pathlib import Path

    from memtrace.jvm import codeblobs, codecache
    from memtrace.jvm.methods import JavaMethods

    doc = json.loads((Path(__file__).parent / "data" / "jdk17_code_heap.json").read_text())
    reads = {key: bytes.fromhex(v) if v is not None else None for key, v in doc["reads"].items()}

    def read(address, size):
        return reads.get(f"{address:x}:{size}")

    def pair(name):
        return tuple(name.rsplit("::", 1))

    structs = VMStructs(offsets={pair(k): v for k, v in doc["offsets"].items()},
                        addresses={pair(k): v for k, v in doc["addresses"].items()},
                        sizes=doc["sizes"])
    java = JavaMethods(2 ** 22 + 1, None)
    java.layout = Layout(structs)
    java.code_layout = codecache.Layout(structs)
    java.blob_layout = codeblobs.Layout(structs, java.code_layout)
    java._read = read
    kinds = set()
    for pc in doc["pcs"]:
        assert java.compiled_code(pc["pc"]) == (pc["perf_map"], pc["offset"]), pc
        kinds.add(codeblobs.blob_at(read, java._heaps, java.blob_layout, pc["pc"]).name)
    assert kinds == {"native nmethod", "nmethod", "StubRoutines (1)"}


def test_when_names_come_only_stacks_with_provisional_frames_are_named_again():
    from types import SimpleNamespace

    from memtrace.collect.collector import Collector

    collector = object.__new__(Collector)
    collector.symbols = SimpleNamespace(generation=1, stale_frames=frozenset({"0x2000 [JIT]"}))
    collector._frames_generation = 0
    named = ("inflateInit2_+0x56 [libz.so.1]", "A.a()+0x4 [JIT]")  # its code since replaced
    collector._frames = {(1, 0): named, (2, 0): ("malloc+0x1 [libc.so.6]", "0x2000 [JIT]")}
    collector._frames_current()
    assert collector._frames == {(1, 0): named}
