"""The Java methods of a HotSpot JVM's interpreted frames, read from
outside.

The template interpreter keeps frame pointers, and each of its frames
holds the Method* being run at fp - 3 words (x86-64). The BPF walk
(bpf/jvm.bpf.c) records that Method*, tagged with JVM_METHOD_TAG, in
place of a return address into the interpreter; this module gives BPF the
interpreter's code range and turns a Method* into `Class.method(args)`:
Method -> ConstMethod -> ConstantPool -> holder Klass's name, and the
method's name and signature Symbols in the pool, at the offsets libjvm.so
exports (memtrace.jvm.vmstructs). Everything read is the target's data:
each pointer and length is checked, and what does not hold together is
not named."""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Iterator, Optional

from memtrace.process import procfs
from memtrace.symbols.elf import exported_objects
from memtrace.process.mappedfile import fd_path, open_mapped
from memtrace.jvm import codeblobs, codecache
from memtrace.jvm.vmstructs import SYMBOLS, VMStructs, Reader, read_vmstructs, u64
from memtrace.model import notes
from memtrace.model.notes import Note

JVM_METHOD_TAG = 1 << 63  # bpf/memtrace.h
MODULE = "Interpreter"  # what interpreted frames show as their module
MAX_SYMBOL = 4096
MAX_NAMES = 100000  # Method* -> name kept, at most

FIELDS = {
    "const_method": ("Method", "_constMethod"),
    "constants": ("ConstMethod", "_constants"),
    "name_index": ("ConstMethod", "_name_index"),
    "signature_index": ("ConstMethod", "_signature_index"),
    "pool_holder": ("ConstantPool", "_pool_holder"),
    "pool_length": ("ConstantPool", "_length"),
    "klass_name": ("Klass", "_name"),
    "symbol_length": ("Symbol", "_length"),
    "symbol_body": ("Symbol", "_body"),
    "stub_buffer": ("StubQueue", "_stub_buffer"),
    "buffer_limit": ("StubQueue", "_buffer_limit"),
}

_PRIMITIVES = {"B": "byte", "C": "char", "D": "double", "F": "float", "I": "int", "J": "long",
               "S": "short", "Z": "boolean", "V": "void"}


class Layout:
    """The offsets the reader needs, from one JVM's tables."""

    def __init__(self, structs: VMStructs) -> None:
        missing = [f"{t}::{f}" for t, f in FIELDS.values() if (t, f) not in structs.offsets]
        if missing or "ConstantPool" not in structs.sizes:
            raise ValueError("this JVM's VMStructs lack " + ", ".join(missing or ["ConstantPool"]))
        for name, key in FIELDS.items():
            setattr(self, name, structs.offsets[key])
        self.pool_size = structs.sizes["ConstantPool"]
        self.interpreter_code = structs.addresses.get(("AbstractInterpreter", "_code"))


def java_type(descriptor: str, at: int = 0) -> tuple[str, int]:
    """The Java spelling of the field descriptor at `at` ('[Ljava/lang/String;'
    -> 'java.lang.String[]'), and where the next one starts."""
    dims = 0
    while at < len(descriptor) and descriptor[at] == "[":
        dims, at = dims + 1, at + 1
    if at >= len(descriptor):
        raise ValueError(descriptor)
    if descriptor[at] == "L":
        stop = descriptor.index(";", at)
        name, at = descriptor[at + 1 : stop].replace("/", "."), stop + 1
    elif descriptor[at] in _PRIMITIVES:
        name, at = _PRIMITIVES[descriptor[at]], at + 1
    else:
        raise ValueError(descriptor)
    return name + "[]" * dims, at


def argument_list(signature: str) -> str:
    """'(Z[BI)V' -> '(boolean, byte[], int)', as the JVM's perf map
    spells a JIT-compiled method; '' for a malformed signature."""
    if not signature.startswith("("):
        return ""
    args, at = [], 1
    try:
        while signature[at] != ")":
            name, at = java_type(signature, at)
            args.append(name)
    except (ValueError, IndexError):
        return ""
    return "(" + ", ".join(args) + ")"


def method_text(holder: str, name: str, signature: str) -> str:
    holder = holder.replace("/", ".")
    hidden = holder.rfind("+0x")  # a hidden class (a lambda's): 'Foo$$Lambda$5+0x7f...'
    if hidden > 0:
        holder = f"{holder[:hidden]}/{holder[hidden + 1:]}"  # as the JVM prints it, and its perf map
    return f"{holder}.{name}{argument_list(signature)}"


def read_method(read: Reader, layout: Layout, method: int) -> Optional[str]:
    """`Class.method(args)` of the Method* `method`, or None where the
    chain does not hold (not a Method*, or being unloaded)."""
    const_method = u64(read, method + layout.const_method)
    if not const_method:
        return None
    raw = read(const_method, max(layout.constants + 8, layout.signature_index + 2,
                                 layout.name_index + 2))
    if raw is None:
        return None
    pool = struct.unpack_from("<Q", raw, layout.constants)[0]
    name_index = struct.unpack_from("<H", raw, layout.name_index)[0]
    signature_index = struct.unpack_from("<H", raw, layout.signature_index)[0]
    if not pool:
        return None
    head = read(pool, max(layout.pool_holder + 8, layout.pool_length + 4))
    if head is None:
        return None
    holder = struct.unpack_from("<Q", head, layout.pool_holder)[0]
    length = struct.unpack_from("<i", head, layout.pool_length)[0]
    if not (0 < name_index < length and 0 < signature_index < length) or not holder:
        return None
    # The pool's slots follow the ConstantPool; a Utf8 slot holds a Symbol*.
    name = _symbol(read, layout, u64(read, pool + layout.pool_size + 8 * name_index))
    signature = _symbol(read, layout, u64(read, pool + layout.pool_size + 8 * signature_index))
    klass = _symbol(read, layout, u64(read, holder + layout.klass_name))
    if not name or signature is None or not klass:
        return None
    return method_text(klass, name, signature)


def _symbol(read: Reader, layout: Layout, symbol: Optional[int]) -> Optional[str]:
    if not symbol or symbol & 7:
        return None
    raw = read(symbol + layout.symbol_length, 2)
    if raw is None:
        return None
    length = struct.unpack("<H", raw)[0]
    if length > MAX_SYMBOL:
        return None
    body = read(symbol + layout.symbol_body, length) if length else b""
    if body is None or not all(32 < b != 127 for b in body):
        return None  # names and descriptors have no spaces nor controls, or it is not a Symbol
    return body.decode("utf-8", errors="replace")


def interpreter_range(read: Reader, layout: Layout) -> Optional[tuple[int, int]]:
    """[start, end) of the template interpreter's code, once it is
    generated (early in the JVM's start)."""
    if not layout.interpreter_code:
        return None
    queue = u64(read, layout.interpreter_code)
    if not queue:
        return None
    start = u64(read, queue + layout.stub_buffer)
    raw = read(queue + layout.buffer_limit, 4)
    if not start or raw is None:
        return None
    size = struct.unpack("<i", raw)[0]
    return (start, start + size) if 0 < size < 1 << 30 else None


class JavaMethods:
    """The interpreter of one JVM, and the names of its methods."""

    def __init__(self, pid: int, libjvm: procfs.Mapping) -> None:
        """libjvm: libjvm.so's lowest mapping (file offset 0)."""
        self.pid = pid
        self.libjvm = libjvm
        self.layout: Optional[Layout] = None
        self.code_layout: Optional[codecache.Layout] = None  # None: compiled frames not walked
        self.code_problem: Optional[str] = None  # why, when the tables lack what it needs
        self.blob_layout: Optional[codeblobs.Layout] = None  # None: compiled code not named here
        self._heaps: Optional[tuple[codecache.CodeHeap, ...]] = None
        self._in_batch = False
        self._batch_fd: Optional[int] = None
        self._read: Optional[Reader] = None  # the batch's, once opened
        self.problem: Optional[Note] = None
        self.hotspot: Optional[bool] = None  # libjvm.so is HotSpot's (None: not read yet)
        self._names: dict[int, tuple[int, str]] = {}  # Method* -> (its ConstMethod*, name)
        self._blobs: dict[int, tuple[codeblobs.Blob, tuple[str, int]]] = {}  # pc -> what was there

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The reads made inside (a stack's frames) share one open reader
        of the target's memory, opened at the first, where each would open
        its own."""
        if self._in_batch:
            yield
            return
        self._in_batch = True
        try:
            yield
        finally:
            self._in_batch = False
            if self._batch_fd is not None:
                os.close(self._batch_fd)
            self._batch_fd = self._read = None

    @contextlib.contextmanager
    def _memory(self) -> Iterator[Reader]:
        """A reader of the target's memory, open for one batch of reads."""
        if self._read is not None:
            yield self._read
            return
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            yield lambda address, size: None  # gone, or not ours to read
            return

        def read(address: int, size: int) -> Optional[bytes]:
            if not 0 < address < 1 << 56 or size <= 0:
                return None
            try:
                data = os.pread(fd, size, address)
            except (OSError, OverflowError, ValueError):
                return None
            return data if len(data) == size else None

        if self._in_batch:  # kept open until the batch ends
            self._batch_fd, self._read = fd, read
            yield read
            return
        try:
            yield read
        finally:
            os.close(fd)

    def _ready(self, read: Reader) -> bool:
        """Whether the layout is known (the tables are read once)."""
        if self.layout is None and self.problem is None:
            try:
                fd = open_mapped(self.pid, self.libjvm)
            except OSError:
                return False
            try:
                exported = exported_objects(fd_path(fd))
            finally:
                os.close(fd)
            self.hotspot = all(name in exported for name in SYMBOLS)
            if not self.hotspot:  # another JVM's libjvm.so (OpenJ9)
                self.problem = Note.of(notes.JVM_NOT_HOTSPOT)
                return False
            structs = read_vmstructs(read, {name: self.libjvm.start + value
                                            for name, value in exported.items()})
            if structs is None:
                return False  # not written yet: ask again later
            try:
                self.code_layout = codecache.Layout(structs)
            except ValueError as e:
                self.code_problem = str(e)
            with contextlib.suppress(ValueError):  # then the perf map alone names compiled code
                if self.code_layout is not None:
                    self.blob_layout = codeblobs.Layout(structs, self.code_layout)
            try:
                self.layout = Layout(structs)
            except ValueError as e:
                self.problem = Note.of(notes.JVM_METHODS_UNREADABLE, reason=str(e))
        return self.layout is not None

    def interpreter(self) -> Optional[tuple[int, int]]:
        """Where the interpreter's code is, once the JVM generated it."""
        with self._memory() as read:
            return interpreter_range(read, self.layout) if self._ready(read) else None

    def code_heaps(self) -> Optional[tuple[codecache.CodeHeap, ...]]:
        """Where the compiled code is (None: not readable, or not yet)."""
        with self._memory() as read:
            if not self._ready(read) or self.code_layout is None:
                return None
            return codecache.read_code_heaps(read, self.code_layout)

    def name(self, method: int) -> Optional[str]:
        """The method's name; a failed read is tried again later (a class
        being loaded), a success is kept, with the method's ConstMethod*,
        read again each time: a Method* freed with its class and reused
        is named anew."""
        with self._memory() as read:
            kept = self._names.get(method)
            if kept is not None and u64(read, method + self.layout.const_method) == kept[0]:
                return kept[1]
            if not self._ready(read):
                return None
            found = read_method(read, self.layout, method)
            const_method = u64(read, method + self.layout.const_method)
        if found is not None and const_method and (kept or len(self._names) < MAX_NAMES):
            self._names[method] = (const_method, found)
        return found

    def compiled_code(self, pc: int) -> Optional[tuple[Optional[str], int]]:
        """What the code heap holds at pc now: (the nmethod's method, or
        another blob's name, the offset from its code's start), with None
        for the name of a blob that does not hold together (an nmethod
        whose Method* does not read); None when no blob is there (freed),
        or the heap is not readable (the JVM gone, or not yet). What was
        found at pc is kept, and each time checked to be still there (the
        same block, the same header)."""
        kept = self._blobs.get(pc)
        with self._memory() as read:
            if not self._ready(read) or self.blob_layout is None:
                return None
            if self._heaps is None:
                self._heaps = codecache.read_code_heaps(read, self.code_layout)
                if self._heaps is None:
                    return None
            if kept is not None and codeblobs.still_there(read, self._heaps, self.blob_layout,
                                                          kept[0], pc):
                return kept[1]
            blob = codeblobs.blob_at(read, self._heaps, self.blob_layout, pc)
        if blob is None:
            return None
        offset = pc - blob.code_begin
        if not blob.is_nmethod:
            found: tuple[Optional[str], int] = (blob.name, offset)
        elif not blob.method or blob.method & 7:
            return None, offset
        else:
            found = (self.name(blob.method), offset)
        if found[0] is not None:
            if len(self._blobs) >= MAX_NAMES:
                self._blobs.clear()
            self._blobs[pc] = (blob, found)
        return found


def for_process(pid: int, mappings) -> Optional[JavaMethods]:
    """A reader for the process when it runs HotSpot (libjvm.so mapped)."""
    jvm = [m for m in mappings if os.path.basename(m.path) == "libjvm.so" and m.offset == 0]
    return JavaMethods(pid, min(jvm, key=lambda m: m.start)) if jvm else None
