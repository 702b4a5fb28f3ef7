"""The bare-probe floor: malloc entry, malloc return and free entry probes
that do nothing, at the sites memtrace would choose.

    sudo .venv/bin/python bench/floor.py -p PID [--entry]

A tracer that records anything can only be slower than this. --entry puts
the probes at +0 instead, to show what the site choice saves. Prints
"floor: attached ..." on stderr once the probes are in, then waits for
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from memtrace.collect.probesite import choose_site, format_sites

BPF_SOURCE = Path(__file__).with_name("floor.bpf.c")


def target_libc(pid: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1]
        if path.endswith("/libc.so.6"):
            return f"/proc/{pid}/root{path}"
    raise SystemExit(f"floor: process {pid} has no libc.so.6 mapped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--pid", type=int, required=True)
    parser.add_argument("--entry", action="store_true", help="probe at +0, not the chosen sites")
    args = parser.parse_args(argv)

    from bcc import BPF

    libc = target_libc(args.pid)
    bpf = BPF(src_file=str(BPF_SOURCE).encode())
    sites = [choose_site(libc, name) for name in ("malloc", "free")]
    for site in sites:
        offset = 0 if args.entry else site.offset
        bpf.attach_uprobe(name=libc.encode(), sym=site.symbol.encode(), sym_off=offset,
                          fn_name=b"on_hit", pid=args.pid)
    bpf.attach_uretprobe(name=libc.encode(), sym=b"malloc", fn_name=b"on_hit", pid=args.pid)
    where = "+0" if args.entry else "; ".join(format_sites(sites))
    print(f"floor: attached 3 probes to {args.pid}: {where}", file=sys.stderr, flush=True)

    stop = lambda *_: None  # noqa: E731  (the signal only has to end the pause)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.pause()
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
