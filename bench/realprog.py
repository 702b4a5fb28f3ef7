"""What tracing costs real programs: sqlite3, `git log -p` and a C++ compile,
untraced and under memtrace, heaptrack, memleak and the bare-probe floor.

    sudo .venv/bin/python bench/realprog.py              # median of 5, ~15 minutes
    sudo .venv/bin/python bench/realprog.py --quick      # 1 rep, small inputs: ~2 minutes
    sudo .venv/bin/python bench/realprog.py --only memtrace --only heaptrack --reps 3

Each program is started behind a gate (`sh -c 'read go; exec PROGRAM'`), so a
tracer that attaches by pid (memtrace -p, memleak -p, the floor) is attached
before the program's first instruction, and its start-up is not counted:
the time measured is from opening the gate to the program's exit, the
program's own run. heaptrack injects itself at launch (`heaptrack PROGRAM`),
so its figure is its whole run, which includes its own start (about 0.1 s)
and the wait for its interpreter to finish. memtrace's whole run (`memtrace
--json -- PROGRAM`, start-up, compile and the end included) is shown too.

Inputs are made once in bench/build/real/: a SQL script of single-row
inserts in one transaction plus an index, a git repository of generated
commits (git fast-import), and a preprocessed C++ file that cc1plus compiles
at -O2. Numbers are reported as ratios to untraced, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import BUILD, HERE, Tracer  # noqa: E402  (bench/ is not a package)

REAL = BUILD / "real"
GATE = ["sh", "-c", 'read go; exec "$@"', "sh"]
RUN_TIMEOUT_S = 900.0


# ---------------------------------------------------------------- inputs


def sqlite_workload(rows: int) -> list[str]:
    script = REAL / f"inserts-{rows}.sql"
    if not script.exists():
        rng = random.Random(7)
        with script.open("w") as out:
            out.write("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, body TEXT);\nBEGIN;\n")
            for i in range(rows):
                name = "".join(rng.choice("abcdefghij") for _ in range(12))
                out.write(f"INSERT INTO t(name, body) VALUES('{name}', '{name * rng.randint(1, 8)}');\n")
            out.write("COMMIT;\nCREATE INDEX t_name ON t(name);\n"
                      "SELECT count(*), sum(length(body)) FROM t GROUP BY substr(name, 1, 2);\n")
    return [shutil.which("sqlite3") or "sqlite3", ":memory:", f".read {script}"]


def git_workload(commits: int) -> list[str]:
    repo = REAL / f"repo-{commits}"
    if not (repo / "HEAD").exists():
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
        rng = random.Random(11)
        files = {f"src/file{i:03d}.txt": [f"line {j} {rng.random()}\n" for j in range(200)]
                 for i in range(60)}
        stream = []
        for c in range(commits):
            stream.append(f"commit refs/heads/main\nmark :{c + 1}\n"
                          f"committer bench <bench@example.org> {1700000000 + c * 60} +0000\n")
            message = f"change {c}\n"
            stream.append(f"data {len(message)}\n{message}")
            if c:
                stream.append(f"from :{c}\n")
            for path in rng.sample(sorted(files), 4):
                lines = files[path]
                for _ in range(10):
                    lines[rng.randrange(len(lines))] = f"edit {c} {rng.random()}\n"
                body = "".join(lines)
                stream.append(f"M 644 inline {path}\ndata {len(body.encode())}\n{body}\n")
        subprocess.run(["git", "-C", str(repo), "fast-import", "--quiet"],
                       input="".join(stream).encode(), check=True)
    return ["git", "-C", str(repo), "log", "-p", "--no-color", "main"]


CXX_SOURCE = """
#include <algorithm>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>
"""


def compile_workload(functions: int) -> list[str]:
    source = REAL / f"unit-{functions}.cc"
    preprocessed = source.with_suffix(".ii")
    if not preprocessed.exists():
        body = [CXX_SOURCE]
        for i in range(functions):
            body.append(f"""
std::map<std::string, std::vector<int>> f{i}(const std::string &text) {{
    std::map<std::string, std::vector<int>> out;
    std::regex word("[a-z]+{i % 7}");
    for (auto it = std::sregex_iterator(text.begin(), text.end(), word);
         it != std::sregex_iterator(); ++it)
        out[it->str()].push_back(static_cast<int>(it->position()));
    std::unordered_map<int, std::function<int(int)>> ops;
    ops[{i}] = [](int x) {{ return x * {i + 1}; }};
    std::sort(out.begin()->second.begin(), out.begin()->second.end());
    return out;
}}
""")
        source.write_text("".join(body))
        subprocess.run(["g++", "-E", "-o", str(preprocessed), str(source)], check=True)
    cc1plus = subprocess.run(["g++", "-print-prog-name=cc1plus"], capture_output=True,
                             text=True, check=True).stdout.strip()
    return [cc1plus, "-fpreprocessed", "-quiet", "-O2", str(preprocessed), "-o", "/dev/null"]


def workloads(quick: bool) -> dict[str, list[str]]:
    REAL.mkdir(parents=True, exist_ok=True)
    return {
        "sqlite3 inserts": sqlite_workload(20_000 if quick else 300_000),
        "git log -p": git_workload(300 if quick else 2_000),
        "cc1plus -O2": compile_workload(5 if quick else 40),
    }


# ---------------------------------------------------------------- configurations


@dataclass
class Config:
    name: str
    # Given the gated program's pid: the tracer's argv (None: none, untraced).
    attach: Optional[Callable[[int], list[str]]] = None
    # Given the program's argv: a launcher's argv, timed as a whole run.
    launch: Optional[Callable[[list[str]], list[str]]] = None
    missing: str = ""


def configs() -> list[Config]:
    memtrace = [sys.executable, "-m", "memtrace"]
    memleak = shutil.which("memleak-bpfcc") or shutil.which("memleak")
    heaptrack = shutil.which("heaptrack")
    scratch = Path(tempfile.gettempdir())
    return [
        Config("untraced"),
        Config("floor", attach=lambda pid: [sys.executable, str(HERE / "floor.py"), "-p", str(pid)]),
        Config("memtrace", attach=lambda pid: [*memtrace, "-p", str(pid), "--json", "-v"]),
        Config("memtrace --light",
               attach=lambda pid: [*memtrace, "-p", str(pid), "--json", "--light", "-v"]),
        Config("memtrace, whole run",
               launch=lambda argv: [*memtrace, "--json", "--", *argv]),
        Config("heaptrack, whole run",
               launch=lambda argv: [heaptrack or "heaptrack", "-o",
                                    str(scratch / f"realprog-heaptrack-{os.getpid()}"), *argv],
               missing="" if heaptrack else "heaptrack is not installed (install.sh --test-tools)"),
        Config("memleak", attach=lambda pid: [memleak or "memleak-bpfcc", "-p", str(pid)],
               missing="" if memleak else "memleak-bpfcc is not installed (Debian bpfcc-tools)"),
    ]


# ---------------------------------------------------------------- running


def run_once(config: Config, argv: list[str]) -> float:
    """Seconds of the program's run under config; raises RuntimeError."""
    if config.launch:
        started = time.monotonic()
        done = subprocess.run(config.launch(argv), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=RUN_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        return time.monotonic() - started
    program = subprocess.Popen([*GATE, *argv], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracer = None
    try:
        if config.attach:
            tracer = Tracer(config.attach(program.pid))
            tracer.wait_attached()
        started = time.monotonic()
        program.stdin.write(b"go\n")
        program.stdin.close()
        code = program.wait(RUN_TIMEOUT_S)
        elapsed = time.monotonic() - started
        if code != 0:
            raise RuntimeError(f"the program exited {code}")
        return elapsed
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        if tracer:
            tracer.stop()


@dataclass
class Result:
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # config -> program -> runs
    failed: dict[tuple[str, str], str] = field(default_factory=dict)  # (config, program) -> why


def measure(chosen: list[Config], programs: dict[str, list[str]], reps: int) -> Result:
    result = Result()
    for rep in range(reps):
        order = chosen[rep % len(chosen):] + chosen[:rep % len(chosen)]
        for config in order:
            for program, argv in programs.items():
                if (config.name, program) in result.failed:
                    continue  # heaptrack crashes on some programs: no use running it again
                print(f"realprog: rep {rep + 1}/{reps} {config.name}: {program}", file=sys.stderr)
                try:
                    took = run_once(config, argv)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    result.failed[config.name, program] = str(e)
                    continue
                result.seconds.setdefault(config.name, {}).setdefault(program, []).append(took)
    return result


def table(result: Result, chosen: list[Config], programs: dict[str, list[str]], reps: int) -> list[str]:
    base = {p: statistics.median(result.seconds["untraced"][p])
            for p in programs if result.seconds.get("untraced", {}).get(p)}
    names = [c.name for c in chosen if c.name != "untraced"]
    lines = [f"median of {reps}; untraced in seconds, the others as a multiple of untraced", "",
             "| program | untraced | " + " | ".join(names) + " |",
             "| --- | --- |" + " --- |" * len(names)]
    for program in programs:
        cells = [f"{base[program]:.2f} s" if program in base else "n/a"]
        for name in names:
            runs = result.seconds.get(name, {}).get(program)
            if (name, program) in result.failed:
                cells.append("failed")
            elif not runs or program not in base:
                cells.append("n/a")
            else:
                cells.append(f"{statistics.median(runs) / base[program]:.2f}x")
        lines.append(f"| {program} | " + " | ".join(cells) + " |")
    for config in chosen:
        if config.missing:
            lines.append(f"- {config.name}: n/a, {config.missing}")
    for (name, program), why in result.failed.items():
        lines.append(f"- {name} on {program}: failed, {why.splitlines()[0] if why else ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 rep, small inputs")
    parser.add_argument("--only", action="append", default=[], metavar="CONFIG",
                        help="run only this configuration (repeatable; untraced always runs)")
    parser.add_argument("--json-out", type=Path, help="also write the raw seconds here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("realprog: needs root (it attaches uprobes): run it with sudo", file=sys.stderr)
        return 2
    reps = 1 if args.quick else args.reps
    chosen = [c for c in configs()
              if c.name == "untraced" or not args.only or c.name in args.only]
    programs = workloads(args.quick)
    runnable = [c for c in chosen if not c.missing]
    result = measure(runnable, programs, reps)
    print("\n".join(table(result, chosen, programs, reps)))
    if args.json_out:
        failed = {f"{name} / {program}": why for (name, program), why in result.failed.items()}
        args.json_out.write_text(json.dumps({"seconds": result.seconds, "failed": failed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
