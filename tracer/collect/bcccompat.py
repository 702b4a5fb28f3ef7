"""A fix for the bcc Python bindings Debian ships (0.26).

bcc's C bpf_attach_uprobe takes a seventh argument, ref_ctr_offset (the
USDT semaphore), that its Python binding neither declares nor passes
(iovisor/bcc#5236): the kernel gets whatever the register held. A uprobe
on a function already probed with another value is then refused with
EINVAL ("ref_ctr_offset mismatch" in dmesg), and an odd value is refused
outright: attaches failed at random, depending on other tracers. Passing
0, which means "no semaphore", is what every caller here means."""

from __future__ import annotations

import ctypes as ct

_ARGTYPES = [ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_ulonglong, ct.c_int, ct.c_uint32]


def pass_zero_ref_ctr_offset() -> None:
    from bcc import libbcc

    declared = getattr(libbcc.lib.bpf_attach_uprobe, "argtypes", None) or []
    if len(declared) != 6:
        return  # already ours, or a bcc that declares all seven
    raw = libbcc.lib["bpf_attach_uprobe"]  # a new function pointer, not the shared one
    raw.argtypes = _ARGTYPES
    raw.restype = ct.c_int

    def bpf_attach_uprobe(prog_fd, attach_type, ev_name, binary_path, offset, pid,
                          ref_ctr_offset=0):
        return raw(prog_fd, attach_type, ev_name, binary_path, offset, pid, ref_ctr_offset)

    bpf_attach_uprobe.argtypes = _ARGTYPES
    libbcc.lib.bpf_attach_uprobe = bpf_attach_uprobe
