"""Real uprobes at the chosen sites read the right argument and caller.

tests/programs/prologues.S has one pro_* function per prologue case and a
call_* caller for each that passes 0x5eed00NN and returns to the ret_*
label. A probe at each chosen site records rdi and the words at the stack
pointer; the word at sp + sp_adjust must be that ret_* address.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from memtrace.collect.probesite import choose_site

pytestmark = pytest.mark.bpf

PROLOGUES = Path(__file__).parents[1] / "programs" / "prologues.S"
CASES = [  # (call_*/pro_* suffix, argument its caller passes)
    ("endbr_first", 1), ("test_first", 2), ("push_first", 3), ("mov_before_push", 4),
    ("clobber_before_push", 5), ("branch_before_push", 6), ("sub_rsp", 7), ("loop_back", 8),
]
CALLS = 3  # each caller runs this many times: each probe must fire as often

DRIVER_C = r"""
#include <stdio.h>
#define CASE(x) void call_##x(void);
%(decls)s
int main(void)
{
	char line[16];
	puts("ready");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	for (int i = 0; i < %(calls)d; i++) {
%(calls_body)s
	}
	puts("done");
	fflush(stdout);
	while (fgets(line, sizeof line, stdin))
		;
	return 0;
}
"""

# Records, per argument value, how often the probe fired and the stack words
# at the probe: the test picks the word at sp_adjust.
BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>

struct hit {
	u64 count;
	u64 stack[8];
};
BPF_HASH(hits, u64, struct hit, 64);

int on_hit(struct pt_regs *ctx)
{
	u64 arg = PT_REGS_PARM1(ctx);
	struct hit zero = {};
	struct hit *h = hits.lookup_or_try_init(&arg, &zero);
	if (!h)
		return 0;
	h->count++;
	bpf_probe_read_user(h->stack, sizeof(h->stack), (void *)PT_REGS_SP(ctx));
	return 0;
}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("probesite")
    so = work / "libprologues.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(PROLOGUES)], check=True)
    source = work / "driver.c"
    source.write_text(DRIVER_C % {
        "decls": "\n".join(f"CASE({name})" for name, _ in CASES),
        "calls": CALLS,
        "calls_body": "\n".join(f"\t\tcall_{name}();" for name, _ in CASES),
    })
    driver = work / "driver"
    subprocess.run(["gcc", "-O1", "-o", str(driver), str(source), str(so),
                    f"-Wl,-rpath,{work}"], check=True)
    return so, driver


def _symbols(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", "--defined-only", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return {f[2]: int(f[0], 16) for f in (line.split() for line in out.splitlines()) if len(f) == 3}


def _load_base(pid: int, path: Path) -> int:
    real = os.path.realpath(path)
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if fields[-1] == real and int(fields[2], 16) == 0:
            return int(fields[0].split("-")[0], 16)
    raise AssertionError(f"{real} is not mapped in process {pid}")


def test_probes_at_chosen_sites_see_argument_and_return_address(built):
    from bcc import BPF  # root, bcc and gcc are checked by tests/conftest.py

    so, driver = built
    sites = {name: choose_site(str(so), f"pro_{name}") for name, _ in CASES}
    symbols = _symbols(so)
    bpf = BPF(text=BPF_TEXT.encode())
    proc = subprocess.Popen([str(driver)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for name, site in sites.items():
            bpf.attach_uprobe(name=str(so).encode(), sym=f"pro_{name}".encode(),
                              sym_off=site.offset, fn_name=b"on_hit", pid=proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        base = _load_base(proc.pid, so)
        hits = {k.value: v for k, v in bpf[b"hits"].items()}
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        bpf.cleanup()

    for name, n in CASES:
        site = sites[name]
        arg = 0x5EED0000 + n
        assert arg in hits, f"pro_{name}+{site.offset}: probe never saw rdi={arg:#x}"
        hit = hits[arg]
        assert hit.count == CALLS, f"pro_{name}+{site.offset}: fired {hit.count} times"
        ret = hit.stack[site.sp_adjust // 8]
        assert ret == base + symbols[f"ret_{name}"], (
            f"pro_{name}+{site.offset}: word at sp+{site.sp_adjust} is {ret:#x}, "
            f"not the return address {base + symbols[f'ret_{name}']:#x}")
