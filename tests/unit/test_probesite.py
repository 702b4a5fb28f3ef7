"""Probe-site selection on synthetic prologues, raw bytes and this glibc."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memtrace.symbols import elf as elfsyms
from memtrace.collect import probesite
from memtrace.collect.probesite import (
    ProbeSite,
    SymbolNotFound,
    choose_site,
    choose_site_in_code,
    choose_sites,
    emulation_kind,
    format_sites,
    probe_refused,
)
from memtrace.errors import MemtraceError

PROLOGUES = Path(__file__).parents[1] / "programs" / "prologues.S"


@pytest.fixture(scope="module")
def prologues_so(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("prologues") / "prologues.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(PROLOGUES)], check=True)
    return str(out)


@pytest.fixture(scope="module")
def libc() -> str:
    # The libc this interpreter runs on is the one traced processes use.
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if re.search(r"/libc\.so\.6$|/libc-[\d.]+\.so$", path):
            return path
    pytest.fail("no libc.so.6 mapped in this process: cannot find glibc")


# name -> (offset, sp_adjust, emulated, words the note must contain)
SYNTHETIC = {
    "pro_endbr_first": (4, 0, True, "push after endbr64"),
    "pro_test_first": (3, 0, True, "jcc after testq"),
    "pro_push_first": (0, 0, True, "push"),
    "pro_mov_before_push": (6, 0, True, "movq %rdi, %rbx"),
    "pro_clobber_before_push": (0, 0, False, "writes rdi"),
    "pro_branch_before_push": (0, 0, False, "transfers control"),
    "pro_sub_rsp": (10, 24, True, "subq $0x10, %rsp"),
    "pro_loop_back": (0, 0, False, "lands on +2"),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_prologues(prologues_so, name):
    offset, sp_adjust, emulated, note = SYNTHETIC[name]
    site = choose_site(prologues_so, name)
    assert (site.offset, site.sp_adjust, site.emulated) == (offset, sp_adjust, emulated)
    assert note in site.note
    assert site.symbol == name
    if emulated:
        assert site.instructions[-1].startswith(f"+{offset} ")


def test_site_by_address_matches_site_by_name(prologues_so):
    by_name = choose_site(prologues_so, "pro_test_first")
    by_address = choose_site(prologues_so, by_name.address)
    assert by_address == by_name
    assert by_name.address > 0


def test_format_sites_names_function_offset_and_instruction(prologues_so):
    site = choose_site(prologues_so, "pro_sub_rsp")
    (line,) = format_sites([site])
    assert line.startswith("pro_sub_rsp+10 ")
    assert "pushq %rbx" in line and "sp+24" in line


def test_missing_symbol_raises_and_choose_sites_leaves_it_out(prologues_so):
    with pytest.raises(SymbolNotFound):
        choose_site(prologues_so, "no_such_function")
    sites = choose_sites(prologues_so, ["pro_push_first", "no_such_function"])
    assert list(sites) == ["pro_push_first"]


def test_unreadable_or_non_elf_file_is_a_one_line_error(tmp_path):
    with pytest.raises(MemtraceError, match="cannot read"):
        choose_site(str(tmp_path / "absent.so"), "malloc")
    text = tmp_path / "text.so"
    text.write_text("not an ELF file\n")
    with pytest.raises(MemtraceError, match="not an ELF file"):
        choose_site(str(text), "malloc")


# --- raw bytes: what the kernel emulates (measured on 6.18 by
# bench/uprobe_emulation.py) ---

EMULATION = [
    ("53", "push"),  # push %rbx
    ("4154", "push"),  # push %r12
    ("4853", None),  # rex.W push %rbx: single-stepped
    ("90", "nop"),
    ("6690", "nop"),  # xchg %ax,%ax
    ("0f1f440000", "nop"),  # nopl 0(%rax,%rax)
    ("660f1f440000", "nop"),  # nopw 0(%rax,%rax)
    ("4190", None),  # xchg %r8,%rax
    ("f390", None),  # pause: newer kernels no longer take it for a nop
    ("eb00", "jmp"),
    ("e900000000", "jmp"),
    ("7400", "jcc"),
    ("0f8400000000", "jcc"),
    ("e800000000", "call"),
    ("f30f1efa", None),  # endbr64
    ("4889fb", None),  # mov %rdi,%rbx
    ("4883ec10", None),  # sub $16,%rsp
    ("4885ff", None),  # test %rdi,%rdi
    ("66e80000", None),  # callw: refused by the kernel
    ("3effe0", None),  # notrack jmp *%rax: refused (ds prefix)
]


@pytest.mark.parametrize("hexbytes,kind", EMULATION)
def test_emulation_kind(hexbytes, kind):
    assert emulation_kind(bytes.fromhex(hexbytes)) == kind


def test_probe_refused_for_bad_prefixes_only():
    assert probe_refused(bytes.fromhex("66e80000"))
    assert probe_refused(bytes.fromhex("3effe0"))
    assert probe_refused(bytes.fromhex("f0480fb10f"))  # lock cmpxchg
    assert not probe_refused(bytes.fromhex("6690"))
    assert not probe_refused(bytes.fromhex("f30f1efa"))


def test_instruction_writing_an_argument_implicitly_stops_the_search():
    # reallocarray: mov %rsi,%rax; mul %rdx (writes rdx:rax); jo ...
    code = bytes.fromhex("4889f0" "48f7e2" "7005" "c3")
    site = choose_site_in_code(code)
    assert (site.offset, site.emulated) == (0, False)
    assert "mulq %rdx writes rdx" in site.note


def test_only_the_watched_registers_matter():
    # mov %ecx,%r10d; test $0xfff,%r9d; jne: like mmap's entry
    code = bytes.fromhex("4189ca" "41f7c1ff0f0000" "7514" "c3")
    assert choose_site_in_code(code).offset == 10
    six_args = ("rdi", "rsi", "rdx", "rcx", "r8", "r9", "r10")
    assert choose_site_in_code(code, arg_regs=six_args).offset == 0


def test_untracked_stack_move_stops_the_search():
    # and $-16,%rsp; push %rbx
    code = bytes.fromhex("4883e4f0" "53" "c3")
    site = choose_site_in_code(code)
    assert (site.offset, site.emulated) == (0, False)
    assert "stack pointer" in site.note


def test_pops_lea_and_add_on_rsp_are_tracked():
    # sub $0x20,%rsp; lea 0x8(%rsp),%rsp; add $8,%rsp; pushq 8(%rdi); push %rbx
    code = bytes.fromhex("4883ec20" "488d642408" "4883c408" "ff7708" "53" "c3")
    site = choose_site_in_code(code)
    assert site.emulated and site.offset == 16
    assert site.sp_adjust == 0x20 - 8 - 8 + 8


def test_no_emulated_instruction_within_max_bytes():
    code = bytes.fromhex("4885ff" * 30 + "53c3")
    site = choose_site_in_code(code, max_bytes=64)
    assert (site.offset, site.emulated) == (0, False)
    assert "first 64 bytes" in site.note


def test_without_capstone_the_entry_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "capstone", None)
    site = choose_site_in_code(bytes.fromhex("53c3"))
    assert (site.offset, site.emulated) == (0, False)
    assert "capstone" in site.note


# --- glibc as installed here ---

GLIBC_ALLOCATORS = [
    "malloc", "free", "calloc", "realloc", "memalign", "aligned_alloc",
    "posix_memalign", "valloc", "pvalloc", "malloc_usable_size",
]
_ARG_DEST = re.compile(r",\s*%(r?di|[re]?si|r?dx|[de]il?|[ds]il|dl|dh)$")


@pytest.mark.parametrize("name", GLIBC_ALLOCATORS)
def test_glibc_allocator_sites_are_emulated_and_safe(libc, name):
    site = choose_site(libc, name)
    assert site.emulated, format_sites([site])
    assert site.offset < 32
    mnemonic = site.instructions[-1].split()[1]
    assert re.match(r"push|j|call|nop", mnemonic)
    # A plain reading of the skipped instructions, independent of capstone's
    # register lists: none branches and none has an argument register as
    # its (AT&T, last) destination.
    for text in site.instructions[:-1]:
        _, mnemonic, *operands = text.split(" ", 2)
        assert not re.match(r"j|call|ret|syscall", mnemonic), text
        if not re.match(r"test|cmp", mnemonic):
            assert not _ARG_DEST.search(" ".join(operands)), text


def test_glibc_ifunc_symbol_is_left_at_its_entry(libc):
    site = choose_site(libc, "memcpy")
    assert (site.offset, site.emulated) == (0, False)
    assert "ifunc" in site.note


def test_elf_image_is_parsed_once_per_file(libc, monkeypatch):
    choose_site(libc, "malloc")
    calls = []
    monkeypatch.setattr(elfsyms.ElfSymbols, "__init__",
                        lambda self, path: calls.append(path))
    assert choose_site(libc, "free").emulated
    assert calls == []


def test_probe_site_is_hashable():
    assert {ProbeSite(0, 0, True, "emulated push", ("+0 pushq %rbx",))}
