"""The compiled BPF object, kept between runs so that clang runs once.

bcc 0.26 compiles on every BPF(text=...), ~1.2 s of CPU and most of a
short trace. After a compile, the programs' instructions (with each map
reference turned back from the fd into the map's index) and the maps'
shapes are written to one file, keyed by everything the compile depended
on: the source text, the -D options, bcc's version and the kernel. A later
run with the same key creates the maps and loads the programs itself
(bpf(2)), and hands bcc an object that attaches and reads maps as its own.

The file becomes kernel code run as root: it is read only when root (or
whoever runs us) owns it and its directory, and nobody else can write to
either; anything else is refused and compiled afresh."""

from __future__ import annotations

import atexit
import ctypes as ct
import errno
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from memtrace.cachefiles import read_trusted, write_trusted

FORMAT = 1  # bumped whenever the file's layout or meaning changes

SYS_BPF = {"x86_64": 321}.get(os.uname().machine)  # bpf(2); None: neither cache nor links
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_BTF_LOAD, BPF_LINK_CREATE = 0, 5, 18, 28
BPF_TRACE_UPROBE_MULTI = 48  # attach type (Linux 6.6)
BPF_F_UPROBE_MULTI_RETURN = 1
BPF_MAP_TYPE_TASK_STORAGE = 29
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1
INSN_BYTES = 8


class Uncacheable(Exception):
    """The compiled object holds something this cache cannot carry."""


@dataclass
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key_desc: str
    leaf_desc: str


@dataclass
class ProgSpec:
    name: str
    code: bytes  # map references zeroed; relocs say which map goes where
    relocs: list  # [instruction index, map index]


@dataclass
class CompiledObject:
    key: str
    license: str
    kern_version: int
    maps: list
    progs: list

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "key": self.key, "license": self.license,
            "kern_version": self.kern_version, "maps": [vars(m) for m in self.maps],
            "progs": [{"name": p.name, "code": p.code.hex(), "relocs": p.relocs}
                      for p in self.progs],
        })

    @classmethod
    def from_json(cls, text: str) -> "CompiledObject":
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')}, not {FORMAT}")
        return cls(doc["key"], doc["license"], int(doc["kern_version"]),
                   [MapSpec(**m) for m in doc["maps"]],
                   [ProgSpec(p["name"], bytes.fromhex(p["code"]), p["relocs"])
                    for p in doc["progs"]])


def usable() -> bool:
    """bpf(2) is called directly only where its number is known."""
    return SYS_BPF is not None


def uprobe_multi_possible() -> bool:
    """Whether uprobes can be uprobe_multi links (Linux 6.6): known before
    any program is loaded, since a program that tail-calls must be loaded
    for the same attach type as the walk it calls."""
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return usable() and release is not None and (int(release[1]), int(release[2])) >= (6, 6)


def cache_key(text: str, cflags: list[str]) -> str:
    """Everything the compiled object depends on: the layers' text and
    the header they #include (bpf/memtrace.h). The kernel's version
    string tells two builds of one release apart (their headers differ)."""
    import bcc

    from memtrace.collect.bpfsource import bpf_dir

    uname = os.uname()
    h = hashlib.sha256()
    header = (bpf_dir() / "memtrace.h").read_text()
    for part in (str(FORMAT), bcc.__version__, uname.release, uname.version, uname.machine,
                 text, header, *cflags):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


# ------------------------------------------------------------- the file

def read_cached(key: str) -> tuple[Optional[CompiledObject], str]:
    """The object cached under key, or None and why not."""
    data, where = read_trusted(f"{key}.json", "object")
    if data is None:
        return None, where
    try:
        obj = CompiledObject.from_json(data.decode())
    except (ValueError, KeyError, TypeError) as e:
        return None, f"cache file {where} unreadable ({e})"
    if obj.key != key:
        return None, f"cache file {where} holds another key"
    return obj, f"BPF object from the cache ({where})"


def write_cached(obj: CompiledObject) -> str:
    said = write_trusted(f"{obj.key}.json", obj.to_json())
    return f"compiled, and {said}" if said.startswith("cached") else said


# ---------------------------------------------------- from a bcc compile

def _declare(lib) -> None:
    if getattr(lib.bpf_table_name, "restype", None) is ct.c_char_p:
        return
    lib.bpf_num_tables.restype = ct.c_ulonglong
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_ulonglong]
    lib.bpf_table_fd_id.restype = ct.c_int
    lib.bpf_table_fd_id.argtypes = [ct.c_void_p, ct.c_ulonglong]
    for name in ("bpf_table_key_size_id", "bpf_table_leaf_size_id"):
        getattr(lib, name).restype = ct.c_size_t
        getattr(lib, name).argtypes = [ct.c_void_p, ct.c_ulonglong]


def extract(bpf, key: str) -> CompiledObject:
    """The object bcc just compiled and loaded its maps for, before any of
    its programs is loaded."""
    from bcc.libbcc import lib

    _declare(lib)
    module = bpf.module
    maps, index_of_fd = [], {}
    for i in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, i)
        index_of_fd[lib.bpf_table_fd_id(module, i)] = len(maps)
        maps.append(MapSpec(
            name=name.decode(), type=lib.bpf_table_type_id(module, i),
            key_size=int(lib.bpf_table_key_size_id(module, i)),
            value_size=int(lib.bpf_table_leaf_size_id(module, i)),
            max_entries=int(lib.bpf_table_max_entries_id(module, i)),
            flags=lib.bpf_table_flags_id(module, i),
            key_desc=(lib.bpf_table_key_desc(module, name) or b"").decode(),
            leaf_desc=(lib.bpf_table_leaf_desc(module, name) or b"").decode()))
    progs = []
    for i in range(lib.bpf_num_functions(module)):
        name = lib.bpf_function_name(module, i)
        code = ct.string_at(lib.bpf_function_start(module, name),
                            lib.bpf_function_size(module, name))
        progs.append(_unrelocated(name.decode(), code, index_of_fd))
    license = lib.bpf_module_license(module)
    return CompiledObject(key, license.decode() if license else "GPL",
                          int(lib.bpf_module_kern_version(module)), maps, progs)


def _unrelocated(name: str, code: bytes, index_of_fd: dict) -> ProgSpec:
    """The program with each map fd bcc wrote into it replaced by 0, and
    where it was."""
    out, relocs = bytearray(code), []
    i = 0
    while i < len(code) // INSN_BYTES:
        op, regs = code[i * INSN_BYTES], code[i * INSN_BYTES + 1]
        if op == LD_IMM64:
            src = regs >> 4
            if src == PSEUDO_MAP_FD:
                fd = struct.unpack_from("<i", code, i * INSN_BYTES + 4)[0]
                if fd not in index_of_fd:
                    raise Uncacheable(f"{name}: instruction {i} names fd {fd}, not a map of ours")
                relocs.append([i, index_of_fd[fd]])
                struct.pack_into("<i", out, i * INSN_BYTES + 4, 0)
            elif src:
                raise Uncacheable(f"{name}: instruction {i} loads a 64-bit value of kind {src}")
            i += 2
        else:
            i += 1
    return ProgSpec(name, bytes(out), relocs)


# ------------------------------------------------------------- bpf(2)

_libc = None


def _bpf(cmd: int, attr: ct.Array) -> int:
    global _libc
    if _libc is None:
        _libc = ct.CDLL(None, use_errno=True)
        _libc.syscall.restype = ct.c_long
    ret = _libc.syscall(ct.c_long(SYS_BPF), ct.c_int(cmd), attr, ct.c_uint(len(attr)))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _btf_for_local_storage(value_size: int) -> bytes:
    """Type information for a task storage map: the kernel wants its key an
    int and its value a type of value_size bytes, and nothing more."""
    strings = b"\0int\0"
    kind_int, kind_struct = 1, 4
    types = struct.pack("<IIII", 1, kind_int << 24, 4, (1 << 24) | 32)  # [1] signed int, 32 bits
    types += struct.pack("<III", 0, kind_struct << 24, value_size)  # [2] struct, no members
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def _load_btf(blob: bytes) -> int:
    buf = ct.create_string_buffer(blob, len(blob))
    attr = ct.create_string_buffer(32)
    struct.pack_into("<QQII", attr, 0, ct.addressof(buf), 0, len(blob), 0)
    return _bpf(BPF_BTF_LOAD, attr)


def _create_map(spec: MapSpec) -> int:
    attr = ct.create_string_buffer(72)
    struct.pack_into("<IIIII", attr, 0, spec.type, spec.key_size, spec.value_size,
                     spec.max_entries, spec.flags)
    attr[28:28 + 15] = spec.name.encode()[:15].ljust(15, b"\0")
    btf_fd = None
    if spec.type == BPF_MAP_TYPE_TASK_STORAGE:
        btf_fd = _load_btf(_btf_for_local_storage(spec.value_size))
        struct.pack_into("<III", attr, 48, btf_fd, 1, 2)
    try:
        return _bpf(BPF_MAP_CREATE, attr)
    finally:
        if btf_fd is not None:
            os.close(btf_fd)  # the map holds its own reference


def _load_prog(spec: ProgSpec, prog_type: int, map_fds: list[int], license: bytes,
               kern_version: int, attach_type: int) -> int:
    code = bytearray(spec.code)
    for insn, index in spec.relocs:
        code[insn * INSN_BYTES + 1] = (code[insn * INSN_BYTES + 1] & 0x0F) | (PSEUDO_MAP_FD << 4)
        struct.pack_into("<i", code, insn * INSN_BYTES + 4, map_fds[index])
    insns = ct.create_string_buffer(bytes(code), len(code))
    lic = ct.create_string_buffer(license)
    log_size = 0
    while True:
        log = ct.create_string_buffer(log_size) if log_size else None
        attr = ct.create_string_buffer(72)
        struct.pack_into("<IIQQIIQII", attr, 0, prog_type, len(code) // INSN_BYTES,
                         ct.addressof(insns), ct.addressof(lic), 1 if log else 0, log_size,
                         ct.addressof(log) if log else 0, kern_version, 0)
        attr[48:48 + 15] = spec.name.encode()[:15].ljust(15, b"\0")
        struct.pack_into("<I", attr, 68, max(0, attach_type))
        try:
            return _bpf(BPF_PROG_LOAD, attr)
        except OSError as e:
            if log is not None or e.errno in (errno.EPERM,):
                said = log.value.decode(errors="replace").strip().splitlines() if log else []
                raise OSError(e.errno, f"{e.strerror}" + (f": {said[-1]}" if said else "")) \
                    from None
            log_size = 1 << 20  # again, for the verifier's reason


def attach_uprobe_multi(prog_fd: int, path: str, offsets: list[int], pid: int,
                        returns: bool) -> int:
    """One link that puts prog at every offset of the file at path, for the
    process pid only; returns its fd. Closing it removes every probe in
    one grace period, where a perf event per probe waits out one each,
    one after the other (~0.1 s a probe)."""
    where = ct.create_string_buffer(path.encode())
    at = (ct.c_uint64 * len(offsets))(*offsets)
    attr = ct.create_string_buffer(64)
    struct.pack_into("<IIII", attr, 0, prog_fd, 0, BPF_TRACE_UPROBE_MULTI, 0)
    struct.pack_into("<QQQQIII", attr, 16, ct.addressof(where), ct.addressof(at), 0, 0,
                     len(offsets), BPF_F_UPROBE_MULTI_RETURN if returns else 0, pid)
    return _bpf(BPF_LINK_CREATE, attr)


def forget_programs(bpf, names) -> None:
    """Unload these programs (loaded for one attach type, wanted for
    another): the next load_func loads them again."""
    for name in names:
        fn = bpf.funcs.pop(name, None)
        if fn is not None:
            os.close(fn.fd)
    verified = getattr(bpf, "_verified", None)
    if verified:
        open_fds = {fn.fd for fn in bpf.funcs.values()}
        bpf._verified = {k: fd for k, fd in verified.items() if fd in open_fds}


def loaded_object(obj: CompiledObject, hold: tuple = (), preload: tuple = ()):
    """A bcc BPF object made from obj: maps created, programs loaded as bcc
    would load them (tracepoint__ ones attached now, except those in hold;
    the rest when attached). preload: (name, prog_type, attach_type) of
    programs about to be attached, verified now alongside the tracepoints'."""
    from bcc import BPF

    class CachedBPF(BPF):
        def __init__(self) -> None:  # noqa: D401 — what BPF.__init__ sets, without clang
            self.kprobe_fds, self.uprobe_fds, self.tracepoint_fds = {}, {}, {}
            self.raw_tracepoint_fds, self.kfunc_entry_fds, self.kfunc_exit_fds = {}, {}, {}
            self.lsm_fds, self.perf_buffers, self.open_perf_events = {}, {}, {}
            self._ringbuf_manager = None
            self.tracefile = None
            self.debug = 0
            self.funcs, self.tables = {}, {}
            self.module = None
            self._map_fds: list[int] = []
            self._progs = {p.name.encode(): p for p in obj.progs}
            self._verified: dict = {}  # (code, type, attach type) -> fd loaded first
            atexit.register(self.cleanup)
            try:
                self._create()
            except BaseException:
                self.cleanup()
                atexit.unregister(self.cleanup)
                raise

        def _create(self) -> None:
            for spec in obj.maps:
                try:
                    self._map_fds.append(_create_map(spec))
                except OSError as e:
                    # in bcc's words, which refused_map() reads
                    raise Exception(f"could not open bpf map: {spec.name}, error: {e.strerror}") \
                        from None
            autoload = [n for n in self._progs if n.startswith(b"tracepoint__") and n not in hold]
            self.load_funcs_at_once([(n, BPF.TRACEPOINT, -1) for n in autoload], list(preload))
            for name in autoload:
                self.attach_tracepoint(tp=name[len(b"tracepoint__"):].replace(b"__", b":"),
                                       fn_name=name)

        def load_funcs_at_once(self, wanted: list, optional: list) -> None:
            """Load (verify) these programs side by side: the verifier takes
            ~0.1 s for a program that walks the stack, and runs on every
            CPU. Programs of the same code are verified once. One of
            `optional` that fails is loaded again, and its failure told, by
            the attach that needs it."""
            from concurrent.futures import ThreadPoolExecutor

            first = {}
            for name, prog_type, attach_type in wanted + optional:
                first.setdefault(self._identity(name, prog_type, attach_type),
                                 (name, prog_type, attach_type))
            with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
                jobs = [pool.submit(self.load_func, name, prog_type, attach_type=attach)
                        for name, prog_type, attach in first.values()]
                for job in jobs:
                    job.exception()
            for name, prog_type, attach in wanted:
                self.load_func(name, prog_type, attach_type=attach)  # raises what failed

        def _identity(self, name, prog_type, attach_type):
            spec = self._progs.get(name)
            return (spec.code if spec else name, str(spec.relocs if spec else ""), prog_type,
                    attach_type)

        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            func_name = func_name.encode() if isinstance(func_name, str) else func_name
            if func_name in self.funcs:
                return self.funcs[func_name]
            spec = self._progs.get(func_name)
            if spec is None:
                raise Exception(f"Unknown program {func_name.decode()}")
            identity = self._identity(func_name, prog_type, attach_type)
            if identity in self._verified:
                fd = os.dup(self._verified[identity])  # the same program, loaded once
            else:
                try:
                    fd = _load_prog(spec, prog_type, self._map_fds, obj.license.encode(),
                                    obj.kern_version, attach_type)
                except OSError as e:
                    raise Exception(f"Failed to load BPF program {func_name.decode()}: "
                                    f"{e.strerror}") from None
                self._verified.setdefault(identity, fd)
            fn = BPF.Function(self, func_name, fd)
            self.funcs[func_name] = fn
            return fn

        def get_table(self, name, keytype=None, leaftype=None, reducer=None):
            name = name.decode() if isinstance(name, bytes) else name
            for index, spec in enumerate(obj.maps):
                if spec.name == name:
                    break
            else:
                raise KeyError(name)
            keytype = keytype or BPF._decode_table_type(json.loads(spec.key_desc))
            leaftype = leaftype or BPF._decode_table_type(json.loads(spec.leaf_desc))
            cls = _table_class(spec.type)
            return cls(self, index, self._map_fds[index], keytype, leaftype, name.encode(),
                       spec=spec, reducer=reducer)

        def close(self):
            super().close()
            for fd in self._map_fds:
                os.close(fd)
            self._map_fds, self._verified = [], {}

    return CachedBPF()


_TABLE_CLASSES: dict = {}


def _table_class(map_type: int):
    """bcc's table class for map_type, taking its shape from the cache where
    bcc's asks the compiled module (which there is none of)."""
    if map_type in _TABLE_CLASSES:
        return _TABLE_CLASSES[map_type]
    from bcc import table

    bases = {
        table.BPF_MAP_TYPE_HASH: table.HashTable,
        table.BPF_MAP_TYPE_ARRAY: table.Array,
        table.BPF_MAP_TYPE_PERCPU_ARRAY: table.PerCpuArray,
        table.BPF_MAP_TYPE_PERCPU_HASH: table.PerCpuHash,
        table.BPF_MAP_TYPE_LRU_HASH: table.LruHash,
        table.BPF_MAP_TYPE_RINGBUF: table.RingBuf,
        table.BPF_MAP_TYPE_PROG_ARRAY: table.ProgArray,
    }
    if map_type not in bases:
        raise Exception(f"memtrace reads no BPF map of type {map_type}")

    class FromCache(table.TableBase):
        """Sits between bcc's class and TableBase in the MRO: sets what
        TableBase.__init__ would read from the module."""

        def __init__(self, bpf, map_id, map_fd, keytype, leaftype, name=None, spec=None,
                     **kwargs):
            self.bpf, self.map_id, self.map_fd = bpf, map_id, map_fd
            self.Key, self.Leaf = keytype, leaftype
            self.ttype, self.flags, self.max_entries = spec.type, spec.flags, spec.max_entries
            self._cbs, self._name = {}, name

    base = bases[map_type]
    per_cpu = base in (table.PerCpuArray, table.PerCpuHash)

    def __init__(self, bpf, map_id, map_fd, keytype, leaftype, name, spec, reducer=None):
        extra = {"reducer": reducer} if per_cpu else {}
        base.__init__(self, bpf, map_id, map_fd, keytype, leaftype, name, spec=spec, **extra)

    cls = type(f"Cached{base.__name__}", (base, FromCache), {"__init__": __init__})
    _TABLE_CLASSES[map_type] = cls
    return cls
