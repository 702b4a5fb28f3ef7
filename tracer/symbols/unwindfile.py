"""A file's unwind rows, kept on disk from one run to the next.

Running the CFA programs of .eh_frame in Python costs 0.05 to 0.4 s a
library on every run, and until a module's rows are in, its calls are
walked by frame pointers only (truncated stacks). A file read once is
read again from memtrace's cache directory in a few ms.

A cache file is named after a digest of everything its rows are made
from: the .eh_frame bytes and where the section and the load segments
sit, and the code that turns them into rows. So a file changed in any way
that matters never meets rows of its old self, and the same library in
another container (another device, inode or mount namespace) finds the
rows made from it anywhere. The files are read and written through
cachefiles' trusted helpers (ours alone, nobody else may write them); one
that is damaged, of another format or of another key is ignored."""

from __future__ import annotations

import hashlib
import struct
import sys
import zlib
from array import array
from typing import Optional

from memtrace.symbols import ehframe

FORMAT = 1  # bumped when the layout, elf.pack_step or what elf.py reads for rows changes
MAGIC = b"MTUNWIND"
MAX_BYTES = 64 << 20  # all unwind files together; the ones used longest ago go first
FRAME_POINTERS = 1  # flag: built with frame pointers, no rows kept
_HEAD = struct.Struct("<8sHHII32s")  # magic, format, flags, segments, rows, key
_SEGMENT = struct.Struct("<QQQ")  # offset, vaddr, filesz
_CRC = struct.Struct("<I")
# Then the rows' two columns as machine words (x86-64 only: little-endian),
# addresses ('Q') then steps ('I'), read back with one copy each.

Segments = list[tuple[int, int, int]]

_code_digest: Optional[bytes] = None


def key_of(machine: int, segments: Segments, section_vaddr: int, eh_frame: bytes) -> bytes:
    """The digest that names the rows made from this .eh_frame."""
    global _code_digest
    if _code_digest is None:
        try:
            with open(ehframe.__file__, "rb") as f:
                _code_digest = hashlib.sha256(f.read()).digest()
        except OSError:  # not installed as source: FORMAT alone tells versions apart
            _code_digest = b""
    h = hashlib.sha256(_code_digest)
    h.update(struct.pack("<HHIQ", FORMAT, machine, len(segments), section_vaddr))
    for segment in segments:
        h.update(_SEGMENT.pack(*segment))
    h.update(eh_frame)
    return h.digest()


def name_of(key: bytes) -> str:
    return f"unwind-{key.hex()}.rows"


def encode(key: bytes, segments: Segments, addresses: array, steps: array,
           frame_pointers: bool) -> bytes:
    body = bytearray(_HEAD.pack(MAGIC, FORMAT, FRAME_POINTERS if frame_pointers else 0,
                                len(segments), len(addresses), key))
    for segment in segments:
        body += _SEGMENT.pack(*segment)
    body += addresses.tobytes() + steps.tobytes()
    body += _CRC.pack(zlib.crc32(body))
    return bytes(body)


def decode(key: bytes, data: bytes) -> Optional[tuple[Segments, array, array, bool]]:
    """(segments, addresses, steps, frame_pointers) from a file's bytes;
    None unless they are whole, of this format, and made for key."""
    if len(data) < _HEAD.size + _CRC.size or sys.byteorder != "little":
        return None
    view = memoryview(data)
    if _CRC.unpack_from(data, len(data) - _CRC.size)[0] != zlib.crc32(view[:-_CRC.size]):
        return None
    magic, version, flags, n_segments, n_rows, stored_key = _HEAD.unpack_from(data)
    if magic != MAGIC or version != FORMAT or stored_key != key:
        return None
    addresses_at = _HEAD.size + n_segments * _SEGMENT.size
    steps_at = addresses_at + 8 * n_rows
    if steps_at + 4 * n_rows + _CRC.size != len(data):
        return None
    addresses, steps = array("Q"), array("I")
    addresses.frombytes(view[addresses_at:steps_at])
    steps.frombytes(view[steps_at:len(data) - _CRC.size])
    segments = list(_SEGMENT.iter_unpack(view[_HEAD.size:addresses_at]))
    return segments, addresses, steps, bool(flags & FRAME_POINTERS)


def load(key: bytes) -> Optional[tuple[Segments, array, array, bool]]:
    """The rows an earlier run kept for key, or None."""
    from memtrace import cachefiles

    try:
        data, _ = cachefiles.read_trusted(name_of(key), "unwind rows")
    except OSError:
        return None
    return decode(key, data) if data is not None else None


def save(key: bytes, segments: Segments, addresses: array, steps: array,
         frame_pointers: bool) -> None:
    from memtrace import cachefiles

    data = encode(key, segments, addresses, steps, frame_pointers)
    cachefiles.write_trusted(name_of(key), data, budget=("unwind-*.rows", MAX_BYTES))
