"""Which instructions does this kernel emulate at a uprobe site?

    sudo .venv/bin/python bench/uprobe_emulation.py [--calls N]

Times a call to each function of bench/insn_kinds.S without and with a
do-nothing uprobe on its first instruction. An emulated instruction costs
one trap (~0.5-1 us); a single-stepped one a second trap on top (~10 us).
The verdict is set against memtrace.collect.probesite.emulation_kind, the
table probe-site selection relies on. "WRONG" means the table counts on an
instruction this kernel single-steps (exit status 1); "unused" marks one
emulated here that the table leaves out (pause: newer kernels single-step
it), which only costs a missed chance.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path

from memtrace.collect.probesite import emulation_kind, function_code

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"


def build() -> tuple[Path, Path]:
    BUILD.mkdir(exist_ok=True)
    lib, loop = BUILD / "insn_kinds.so", BUILD / "call_loop"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(HERE / "insn_kinds.S")], check=True)
    subprocess.run(["gcc", "-O2", "-o", str(loop), str(HERE / "call_loop.c"), "-ldl"], check=True)
    return lib, loop


def kinds() -> list[str]:
    text = (HERE / "insn_kinds.S").read_text()
    return re.findall(r"^KIND\((\w+)\)", text, re.M)


def ns_per_call(bpf, loop: Path, lib: Path, symbol: str, calls: int, probed: bool) -> float | str:
    proc = subprocess.Popen([str(loop), str(lib), symbol, str(calls)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            return "call_loop failed"
        if probed:
            try:
                bpf.attach_uprobe(name=str(lib).encode(), sym=symbol.encode(),
                                  fn_name=b"on_hit", pid=proc.pid)
            except Exception as e:  # bcc raises bare Exceptions
                return f"refused ({e})"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = float(proc.stdout.readline().split()[1])
        if probed:
            bpf.detach_uprobe(name=str(lib).encode(), sym=symbol.encode(), pid=proc.pid)
        return result
    finally:
        proc.stdin.close()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    args = parser.parse_args(argv)

    from bcc import BPF

    lib, loop = build()
    bpf = BPF(src_file=str(HERE / "floor.bpf.c").encode())
    rows = []
    for kind in kinds():
        symbol = f"kind_{kind}"
        base = ns_per_call(bpf, loop, lib, symbol, args.calls, probed=False)
        probed = ns_per_call(bpf, loop, lib, symbol, args.calls, probed=True)
        rows.append((kind, symbol, base, probed))

    # Emulated and stepped costs differ ~15x: split at the geometric mean of
    # the two known cases.
    cost = {k: p - b for k, _, b, p in rows if isinstance(p, float)}
    threshold = math.sqrt(cost["push_rbx"] * cost["endbr64"])
    print(f"{'first instruction':<16} {'hex':<14} {'us/hit':>7}  {'measured':<15} table")
    wrong = 0
    for kind, symbol, base, probed in rows:
        first = _first_instruction(function_code(str(lib), symbol, 16))
        predicted = emulation_kind(first)
        if not isinstance(probed, float):
            measured, us, emulated = probed, "", False
        else:
            emulated = cost[kind] < threshold
            measured, us = ("emulated" if emulated else "single-stepped"), f"{cost[kind] / 1000:.2f}"
        flag = ""
        if predicted and not emulated:
            flag, wrong = "   WRONG", wrong + 1
        elif emulated and not predicted:
            flag = "   unused"
        print(f"{kind:<16} {first.hex():<14} {us:>7}  {measured:<15} {predicted or '-'}{flag}")
    return 1 if wrong else 0


def _first_instruction(code: bytes) -> bytes:
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insn = next(md.disasm(code, 0))
    return bytes(insn.bytes)


if __name__ == "__main__":
    sys.exit(main())
