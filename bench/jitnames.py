"""How many of a JVM's JIT-compiled frames memtrace names, without warm-up
(issue 11): the inflater program (tests/programs/Inflate.java, default
flags, no -XX:+PreserveFramePointer, its workers started as soon as the
trace is attached, so C1's code is replaced by C2's while they run) and
Debian's Tomcat 10 traced from its launch through startup and 5 s of
requests.

    sudo .venv/bin/python bench/jitnames.py                 # both, 3 runs each
    sudo .venv/bin/python bench/jitnames.py --only inflate --runs 5

A `[JIT]` frame is named when it is not a bare address (`0x7f... [JIT]`).
Figures: frames counted once per stack they are in, in the libz stacks
(the Inflaters' memory) and in all stacks."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMTRACE = [sys.executable, "-m", "memtrace"]
TOMCAT_HOME = Path("/usr/share/tomcat10")
TOMCAT_BASE = Path("/var/lib/tomcat10")
# The Java methods that create Inflaters: the inflater program's and Tomcat's
CREATORS = ("Inflate$Worker.inflateOne(", "java.util.zip.ZipFile.getInputStream(")


def jit_shares(doc: dict) -> dict:
    def count(stacks) -> tuple[int, int]:
        frames = [f for s in stacks for f in s["frames"] if f.endswith(" [JIT]")]
        return sum(not f.startswith("0x") for f in frames), len(frames)

    libz = [s for s in doc["stacks"] if any("[libz.so" in f for f in s["frames"][:3])]
    live = sum(s["live_bytes"] for s in libz)
    creator = sum(s["live_bytes"] for s in libz
                  if any(f.startswith(CREATORS) for f in s["frames"]))
    out = {"libz_live_reaching_creator": f"{100 * creator / max(1, live):.0f} %"}
    for name, stacks in (("libz", libz), ("all", doc["stacks"])):
        named, total = count(stacks)
        out[name] = f"{named}/{total} ({100 * named / max(1, total):.0f} %)"
    return out


def wait_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{path.name} never came")
        time.sleep(0.05)
    return json.loads(path.read_text())


def no_jcmd_env(work: Path) -> dict:
    """memtrace's environment with a jcmd that fails first on PATH: no
    perf map, the code heap alone names compiled frames."""
    bin_dir = work / "no-jcmd"
    bin_dir.mkdir()
    (bin_dir / "jcmd").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "jcmd").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def run_inflate(work: Path, per_thread: int, flags: list[str], env: dict) -> dict:
    classes = work / "classes"
    subprocess.run(["javac", "-d", str(classes), str(ROOT / "tests/programs/Inflate.java")], check=True)
    java = subprocess.Popen(["java", "-XX:+UseSerialGC", "-Xmx128m", *flags, "-cp", str(classes),
                             "Inflate", str(work), "--threads", "2", "--per-thread", str(per_thread),
                             "--warmup", "0"],
                            stdin=subprocess.DEVNULL)
    tracer = None
    try:
        pid = wait_file(work / "ready.json", java)["pid"]
        log = work / "memtrace.err"
        with open(log, "w") as err:
            tracer = subprocess.Popen([*MEMTRACE, "--json", "-v", "--interval", "0.5", "-p", str(pid)],
                                      stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        while "probes attached" not in log.read_text():  # -v's last line before the loop
            if tracer.poll() is not None:
                raise SystemExit(log.read_text()[-2000:])
            time.sleep(0.05)
        (work / "ready.go").touch()
        wait_file(work / "phase1.json", java)
        time.sleep(1.0)
        tracer.send_signal(signal.SIGINT)
        out, _ = tracer.communicate(timeout=120)
        if not out:
            raise SystemExit(log.read_text()[-2000:])
        return json.loads(out)
    finally:
        for p in (tracer, java):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _get(port: int) -> None:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
    except OSError:
        pass


def run_tomcat(work: Path, env: dict) -> dict:
    base = work / "tomcat"
    # conf is a symlink to /etc/tomcat10: copied, never written through
    base.mkdir()
    subprocess.run(["cp", "-rL", str(TOMCAT_BASE / "conf"), str(TOMCAT_BASE / "webapps"), str(base)],
                   check=True)
    for name in ("logs", "work", "temp"):
        (base / name).mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = base / "conf" / "server.xml"
    server.write_text(server.read_text().replace('<Connector port="8080"', f'<Connector port="{port}"')
                      .replace('<Server port="8005"', '<Server port="-1"'))
    env = dict(env, CATALINA_HOME=str(TOMCAT_HOME), CATALINA_BASE=str(base),
               CATALINA_TMPDIR=str(base / "temp"), JAVA_OPTS="")
    out_path = work / "tomcat.json"
    with open(out_path, "w") as out:
        tracer = subprocess.Popen([*MEMTRACE, "--json", "--interval", "1", "--", "sh", "-c",
                                   f'exec "{TOMCAT_HOME}/bin/catalina.sh" run'],
                                  env=env, stdout=out, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or tracer.poll() is not None:
                    raise SystemExit("Tomcat did not serve")
                time.sleep(0.5)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            _get(port)
        java = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_tomcat(p, base))
        os.kill(java, signal.SIGTERM)
        tracer.wait(120)
    finally:
        if tracer.poll() is None:
            tracer.kill()
    return json.loads(out_path.read_text())


def _is_tomcat(pid: str, base: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"java") and f"-Dcatalina.base={base}".encode() in argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("inflate", "tomcat"), action="append")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-thread", type=int, default=150, help="the inflater program's Inflaters")
    parser.add_argument("--java-flag", action="append", default=[], help="for the inflater program")
    parser.add_argument("--no-jcmd", action="store_true",
                        help="no perf map: a jcmd that fails first on memtrace's PATH")
    parser.add_argument("--keep", type=Path, help="write each run's JSON into this directory")
    args = parser.parse_args()
    for name in args.only or ("inflate", "tomcat"):
        for i in range(args.runs):
            work = Path(tempfile.mkdtemp(prefix=f"jitnames-{name}-"))
            try:
                env = no_jcmd_env(work) if args.no_jcmd else dict(os.environ)
                doc = (run_inflate(work, args.per_thread, args.java_flag, env) if name == "inflate"
                       else run_tomcat(work, env))
                print(name, i + 1, json.dumps(jit_shares(doc)), flush=True)
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    (args.keep / f"{name}-{i + 1}.json").write_text(json.dumps(doc))
            finally:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
