"""Choose where in a function to put its entry uprobe.

A uprobe replaces one instruction with int3. On the hit the kernel either
emulates that instruction (push, jmp, jcc, call, nop: ~0.5 us) or copies it
to a scratch page and single-steps it there (~10 us, a second trap). glibc's
free starts with `test %rdi,%rdi`, Ubuntu's malloc with `endbr64`: both are
single-stepped, so probing at +0 costs ~20x what it must.

The site chosen is the first instruction the kernel emulates, provided that
every path through the function reaches it with the arguments untouched:
no instruction before it writes an argument register or transfers control,
and no branch inside the function lands on it or before it (a loop back to
it would fire the probe twice). The skipped instructions may move the stack
pointer (pushes, `sub $n,%rsp`); `sp_adjust` says how far, so the BPF side
still finds the return address at `sp + sp_adjust`.

Which instructions are emulated is arch/x86/kernel/uprobes.c
(branch_setup_xol_ops, push_setup_xol_ops): push %reg (no REX but 0x41),
jmp, jcc, call rel32 (no 0x66 prefix), and nops; the table below keeps to
what kernel 6.18 and later agree on, confirmed on 6.18 by
bench/uprobe_emulation.py. Newer kernels also take mov %reg,%reg and
lea 0(%reg),%reg for nops; nothing here relies on that. Where no safe
emulated site exists the entry (+0) is used: single-stepped, slow, but
always correct.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import takewhile
from typing import Iterable, Optional, Sequence, Union

from memtrace.symbols.elf import ElfSymbols, FunctionSymbol, symbols_of
from memtrace.errors import MemtraceError
from memtrace.process.mappedfile import open_path

# Argument registers the malloc family's probes read: size or pointer
# (rdi), size or count (rsi), out-pointer of posix_memalign (rdx).
MALLOC_ARG_REGS = ("rdi", "rsi", "rdx")

# How far into a function a site may be. glibc's sites are within 16 bytes;
# further in, "before any branch" rarely still holds.
DEFAULT_MAX_BYTES = 64

_MAX_INSN_BYTES = 15

# Branch targets are looked for in at most this much of a function.
_MAX_FUNCTION_SCAN = 1 << 20


@dataclass(frozen=True)
class ProbeSite:
    """Where to attach: `offset` bytes into the function; the caller's
    return address is at `sp + sp_adjust` when the probe fires."""

    offset: int
    sp_adjust: int
    emulated: bool
    note: str
    instructions: tuple[str, ...] = ()  # "+off text", decoded up to the site
    symbol: str = ""
    address: int = 0  # the function's address in the ELF file (st_value)


class SymbolNotFound(MemtraceError):
    """The ELF file defines no such function: that probe cannot be attached."""


# -- which instructions the kernel emulates ---------------------------------

_LEGACY_PREFIXES = frozenset(
    (0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67)
)
# The kernel refuses a probe on an instruction with these (is_prefix_bad).
_REFUSED_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0xF0))


def _split_prefixes(raw: bytes) -> tuple[bytes, Optional[int], bytes]:
    """(legacy prefixes, REX byte or None, opcode and the rest)."""
    i = 0
    while i < len(raw) and raw[i] in _LEGACY_PREFIXES:
        i += 1
    prefixes = raw[:i]
    rex = None
    if i < len(raw) and 0x40 <= raw[i] <= 0x4F:
        rex = raw[i]
        i += 1
    return prefixes, rex, raw[i:]


def probe_refused(raw: bytes) -> bool:
    """True when the kernel would reject a uprobe on this instruction."""
    prefixes, _, rest = _split_prefixes(raw)
    if _REFUSED_PREFIXES.intersection(prefixes):
        return True
    # A 16-bit branch (66 prefix) is refused rather than single-stepped.
    return 0x66 in prefixes and _branch_kind(rest) is not None


def _branch_kind(rest: bytes) -> Optional[str]:
    if not rest:
        return None
    op = rest[0]
    if op in (0xEB, 0xE9):
        return "jmp"
    if op == 0xE8:
        return "call"
    if 0x70 <= op <= 0x7F:
        return "jcc"
    if op == 0x0F and len(rest) > 1 and 0x80 <= rest[1] <= 0x8F:
        return "jcc"
    return None


def emulation_kind(raw: bytes) -> Optional[str]:
    """The kind ("push", "jmp", "jcc", "call", "nop") the kernel emulates
    this instruction as, or None when it single-steps (or refuses) it."""
    if probe_refused(raw):
        return None
    prefixes, rex, rest = _split_prefixes(raw)
    if not rest:
        return None
    op = rest[0]
    if 0x50 <= op <= 0x57:
        # push %reg; of REX prefixes only 0x41 (%r8-%r15) is handled.
        if not prefixes and rex in (None, 0x41) and len(rest) == 1:
            return "push"
        return None
    if op == 0x90:
        # REX.B 90 is xchg %r8,%rax; F3 90 is pause, which kernels with
        # the unified insn_is_nop() (late 2025) no longer take for a nop.
        if (rex is None or not rex & 1) and 0xF3 not in prefixes:
            return "nop"
        return None
    if op == 0x0F and len(rest) > 2 and rest[1] == 0x1F:
        # nopl/nopw with /0: emulated in the forms compilers emit.
        if rex is None and set(prefixes) <= {0x66} and (rest[2] >> 3) & 7 == 0:
            return "nop"
        return None
    return _branch_kind(rest)


# -- what a skipped instruction does ------------------------------------------

_LEGACY_FAMILIES = {
    "rax": ("rax", "eax", "ax", "al", "ah"),
    "rbx": ("rbx", "ebx", "bx", "bl", "bh"),
    "rcx": ("rcx", "ecx", "cx", "cl", "ch"),
    "rdx": ("rdx", "edx", "dx", "dl", "dh"),
    "rsi": ("rsi", "esi", "si", "sil"),
    "rdi": ("rdi", "edi", "di", "dil"),
    "rbp": ("rbp", "ebp", "bp", "bpl"),
    "rsp": ("rsp", "esp", "sp", "spl"),
}
_FAMILY_OF = {alias: reg for reg, aliases in _LEGACY_FAMILIES.items() for alias in aliases}


def _register_family(name: str) -> str:
    """The 64-bit register a (sub)register name belongs to: edi -> rdi."""
    if name in _FAMILY_OF:
        return _FAMILY_OF[name]
    if name.startswith("r") and name[1:].rstrip("dwb").isdigit():
        return name.rstrip("dwb")
    return name


_CONTROL_GROUPS = ("jump", "call", "ret", "int", "iret", "branch_relative")
_CONTROL_MNEMONICS = ("syscall", "sysenter", "ud2", "hlt", "int3", "ud0", "ud1")


def _is_control_flow(insn) -> bool:
    if insn.mnemonic in _CONTROL_MNEMONICS:
        return True
    return any(insn.group_name(g) in _CONTROL_GROUPS for g in insn.groups)


def _registers_written(insn) -> set[str]:
    _, written = insn.regs_access()
    return {_register_family(insn.reg_name(r)) for r in written}


def _stack_delta(insn, capstone) -> Optional[int]:
    """How many bytes the instruction moves the stack pointer down (what it
    adds to sp_adjust), or None when it moves it by an amount unknown here."""
    if "rsp" not in _registers_written(insn):
        return 0
    x86 = capstone.x86
    mnemonic = insn.mnemonic
    if mnemonic == "pushq":
        return 8
    if mnemonic == "popq":
        return -8
    ops = insn.operands
    imms = [op.imm for op in ops if op.type == x86.X86_OP_IMM]
    to_rsp = any(op.type == x86.X86_OP_REG and op.reg == x86.X86_REG_RSP for op in ops)
    if mnemonic in ("subq", "addq") and to_rsp and len(imms) == 1:
        return imms[0] if mnemonic == "subq" else -imms[0]
    if mnemonic == "leaq" and to_rsp:
        mems = [op.mem for op in ops if op.type == x86.X86_OP_MEM]
        if len(mems) == 1 and mems[0].base == x86.X86_REG_RSP and mems[0].index == 0:
            return -mems[0].disp
    return None


def _describe(insn, base: int) -> str:
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    return f"+{insn.address - base} {text}"


def _disassembler(capstone):
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    md.syntax = capstone.CS_OPT_SYNTAX_ATT
    return md


def _first_internal_target(md, code: bytes, vaddr: int) -> tuple[Optional[int], bool]:
    """Smallest offset > 0 that a direct branch inside the function jumps
    to, and whether the whole function decoded."""
    first = None
    end = vaddr
    for insn in md.disasm(code, vaddr):
        end = insn.address + insn.size
        if _branch_kind(_split_prefixes(bytes(insn.bytes))[2]) is None:
            continue
        target = insn.operands[0].imm if insn.operands else None
        if target is None:
            continue
        offset = target - vaddr
        if 0 < offset < len(code) and (first is None or offset < first):
            first = offset
    return first, end - vaddr >= len(code)


def choose_site_in_code(
    code: bytes,
    vaddr: int = 0,
    arg_regs: Sequence[str] = MALLOC_ARG_REGS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    symbol: str = "",
) -> ProbeSite:
    """Pick the site in `code`, the function's bytes (all of them when
    known, so that branches back into the prologue are seen)."""
    try:
        import capstone
    except ImportError:
        return ProbeSite(0, 0, False, "single-stepped: capstone is not installed "
                         "(pip install capstone)", (), symbol, vaddr)
    md = _disassembler(capstone)
    watched = {_register_family(r) for r in arg_regs}
    loop_target, whole = _first_internal_target(md, code, vaddr)
    search_end = min(max_bytes, len(code))
    if loop_target is not None:
        search_end = min(search_end, loop_target)

    sp_adjust = 0
    seen: list[str] = []
    skipped: list[str] = []
    decoded_to = 0
    # An instruction may start before search_end and end after it.
    decoded = md.disasm(code[:search_end + _MAX_INSN_BYTES], vaddr)
    for insn in takewhile(lambda i: i.address - vaddr < search_end, decoded):
        offset = insn.address - vaddr
        text = _describe(insn, vaddr)
        seen.append(text)
        decoded_to = offset + insn.size
        kind = emulation_kind(bytes(insn.bytes))
        if kind is not None:
            note = f"emulated {kind}"
            if skipped:
                note += " after " + "; ".join(s.split(" ", 1)[1] for s in skipped)
            if not whole:
                note += " (function only partly decoded)"
            return ProbeSite(offset, sp_adjust, True, note, tuple(seen), symbol, vaddr)
        if _is_control_flow(insn):
            why = f"{text} transfers control before any emulated instruction"
            break
        clobbered = sorted(_registers_written(insn) & watched)
        if clobbered:
            why = f"{text} writes {', '.join(clobbered)} before any emulated instruction"
            break
        delta = _stack_delta(insn, capstone)
        if delta is None:
            why = f"{text} moves the stack pointer by an amount not tracked here"
            break
        sp_adjust += delta
        skipped.append(text)
    else:
        if decoded_to < search_end:
            why = f"cannot decode the instruction at +{decoded_to}"
        elif loop_target is not None and loop_target == search_end:
            why = f"a branch inside the function lands on +{loop_target}"
        else:
            why = f"no emulated instruction in the first {search_end} bytes"
    return ProbeSite(0, 0, False, f"single-stepped: {why}", tuple(seen), symbol, vaddr)


# -- reading functions out of an ELF file -------------------------------------

_STT_GNU_IFUNC = 10
_EM_X86_64 = 62


def _lookup(elf_path: str, symbol_vaddr_or_name: Union[str, int]) -> tuple[ElfSymbols, FunctionSymbol]:
    try:
        os.close(open_path(elf_path))
    except OSError as e:
        raise MemtraceError(f"cannot read {elf_path}: {e.strerror or e}; "
                            "check the path of the traced library") from None
    image = symbols_of(elf_path)
    if not image.segments:
        raise MemtraceError(f"{elf_path} is not an ELF file (64-bit expected); give the path of a "
                            "shared library or executable")
    if isinstance(symbol_vaddr_or_name, int):
        found = next((f for f in image.functions if f.address == symbol_vaddr_or_name), None)
        return image, found or FunctionSymbol(f"0x{symbol_vaddr_or_name:x}",
                                              symbol_vaddr_or_name, 0, 2, True)
    found = image.find(symbol_vaddr_or_name)
    if found is None:
        raise SymbolNotFound(f"{elf_path} defines no function {symbol_vaddr_or_name!r}; "
                             "that probe is left out")
    return image, found


def _code(image: ElfSymbols, function: FunctionSymbol, size: int) -> bytes:
    code = image.read(function.address, size)
    if code is None:
        raise MemtraceError(f"address 0x{function.address:x} is not in a loaded segment of "
                            f"{function.name}'s file; the symbol table looks damaged")
    return code


def function_code(elf_path: str, symbol_vaddr_or_name: Union[str, int],
                  max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The first bytes of a function as the ELF file holds them."""
    image, function = _lookup(elf_path, symbol_vaddr_or_name)
    return _code(image, function, min(function.size or max_bytes, max_bytes))


def choose_site(
    elf_path: str,
    symbol_vaddr_or_name: Union[str, int],
    max_bytes: int = DEFAULT_MAX_BYTES,
    arg_regs: Sequence[str] = MALLOC_ARG_REGS,
) -> ProbeSite:
    """The probe site of one function of an ELF file, named or by address.

    Raises SymbolNotFound when a named function is not defined there."""
    image, function = _lookup(elf_path, symbol_vaddr_or_name)
    if image.machine != _EM_X86_64:
        return ProbeSite(0, 0, False, "single-stepped: not x86-64 code", (),
                         function.name, function.address)
    if function.kind == _STT_GNU_IFUNC:
        # The symbol is the resolver; the implementation is chosen at run time.
        return ProbeSite(0, 0, False, "GNU ifunc: the resolver's entry", (),
                         function.name, function.address)
    size = function.size or max_bytes
    code = _code(image, function, min(size, _MAX_FUNCTION_SCAN))
    return choose_site_in_code(code, function.address, arg_regs, max_bytes, function.name)


def choose_sites(
    elf_path: str,
    names: Iterable[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    arg_regs: Sequence[str] = MALLOC_ARG_REGS,
) -> dict[str, ProbeSite]:
    """Sites for every function of `names` the file defines; missing ones
    are left out (the caller warns about them)."""
    sites = {}
    for name in names:
        try:
            sites[name] = choose_site(elf_path, name, max_bytes, arg_regs)
        except SymbolNotFound:
            continue
    return sites


def format_sites(sites: Iterable[ProbeSite]) -> list[str]:
    """One line per site for --verbose: where, on what, and why."""
    lines = []
    for site in sites:
        where = f"{site.symbol or hex(site.address)}+{site.offset}"
        on = next((text.split(" ", 1)[1] for text in site.instructions
                   if text.startswith(f"+{site.offset} ")), "")
        lines.append(f"{where:<22} {on:<26} sp+{site.sp_adjust:<4} {site.note}")
    return lines
