"""Static checks of the Vagrant lab and of every shell script in the repo.

No VM is started here (none can be downloaded): the Vagrantfile is checked
by `vagrant validate`, the scripts by shellcheck, and vagrant/run against a
stand-in `vagrant` that runs the guest's commands on this machine. A missing
vagrant or shellcheck fails its tests with the fix, it never skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from memtrace.demos.catalog import DEMOS

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "vagrant"
RUN = LAB / "run"
# Folders whose shell scripts are not ours (the venv's packages, VM state).
FOREIGN_DIRS = {".git", ".venv", "node_modules", ".vagrant", "build", "__pycache__"}
NAMED_SCRIPTS = ("vagrant/run", "vagrant/box/build", "install.sh", ".ci/run", "tests/run")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install Debian's {package} package "
            f"(sudo ./install.sh --test-tools does)",
            pytrace=False,
        )
    return path


def _shell_scripts() -> list[str]:
    found = {
        str(p.relative_to(REPO))
        for p in REPO.rglob("*.sh")
        if not FOREIGN_DIRS.intersection(p.relative_to(REPO).parts)
    }
    found.update(name for name in NAMED_SCRIPTS if (REPO / name).is_file())
    return sorted(found)


# ---------------------------------------------------------------- Vagrantfile


def _validate(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACE_")}
    env.update(settings)
    env.update(
        VAGRANT_CWD=str(LAB),
        # Keep Vagrant's state out of the checkout and the user's home.
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
        VAGRANT_HOME=str(tmp_path / "home"),
        VAGRANT_CHECKPOINT_DISABLE="1",
    )
    # --ignore-provider: no provider (VirtualBox, libvirt) is installed here.
    return subprocess.run(
        [_tool("vagrant", "vagrant"), "validate", "--ignore-provider"],
        env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"MEMTRACE_BOX": "debian12", "MEMTRACE_SYNC": "virtualbox",
         "MEMTRACE_VM_MEMORY": "8192", "MEMTRACE_VM_CPUS": "4"},
        {"MEMTRACE_BOX": "local", "MEMTRACE_VM_DRIVER": "qemu"},
        {"MEMTRACE_BOX": "local", "MEMTRACE_VM_DRIVER": "kvm"},
    ],
    ids=["defaults", "debian12-shared-folder", "local-box-emulated", "local-box-kvm"],
)
def test_vagrantfile_validates(tmp_path: Path, settings: dict) -> None:
    done = _validate(tmp_path, **settings)
    assert done.returncode == 0, f"vagrant validate failed:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize(
    "name, value",
    [("MEMTRACE_BOX", "fedora"), ("MEMTRACE_VM_MEMORY", "lots"), ("MEMTRACE_SYNC", "ftp"),
     ("MEMTRACE_VM_DRIVER", "xen")],
)
def test_vagrantfile_rejects_a_bad_setting_by_name(tmp_path: Path, name: str, value: str) -> None:
    done = _validate(tmp_path, **{name: value})
    assert done.returncode != 0
    assert f"{name}={value}" in done.stderr


def test_box_build_answers_help_and_refuses_an_unknown_option() -> None:
    build = LAB / "box" / "build"
    done = subprocess.run([str(build), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "memtrace/debian12-local" in done.stdout, done.stderr
    done = subprocess.run([str(build), "--fast"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--fast" in done.stderr, done.stderr


def test_readme_names_every_reproduction() -> None:
    readme = (LAB / "README.md").read_text()
    missing = [name for name in DEMOS if f"`{name}`" not in readme]
    assert not missing, f"vagrant/README.md needs a line for each demo; missing: {missing}"


# ---------------------------------------------------------------- shellcheck


def test_the_named_scripts_are_found() -> None:
    assert "vagrant/run" in _shell_scripts()


@pytest.mark.parametrize("script", _shell_scripts())
def test_shellcheck(script: str) -> None:
    done = subprocess.run(
        [_tool("shellcheck", "shellcheck"), "--format=gcc", script],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"shellcheck {script}:\n{done.stdout}{done.stderr}"


# ---------------------------------------------------------------- vagrant/run

# Stands in for vagrant: logs each call and runs `ssh -c` commands here, with
# the guest's /vagrant mapped to $FAKE_GUEST.
FAKE_VAGRANT = r"""#!/usr/bin/env bash
set -eu
printf '%s\n' "$*" >> "$FAKE_LOG"
case "$1" in
    status) echo "1700000000,memtrace,state,$FAKE_STATE" ;;
    up|rsync) ;;
    ssh)
        shift
        cmd=
        while [ "$#" -gt 0 ]; do
            if [ "$1" = -c ]; then cmd=$2; shift; fi
            shift
        done
        cmd=${cmd//\/vagrant\//$FAKE_GUEST/}
        exec bash -c "$cmd"
        ;;
    *) echo "fake vagrant: unexpected $1" >&2; exit 1 ;;
esac
"""

# Stands in for memtrace in the guest: records its argv, writes a recording
# with the bytes a tty would mangle, and exits with $FAKE_RC.
FAKE_MEMTRACE = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ARGV"], "w") as f:
    json.dump(args, f)
with open(args[args.index("--record") + 1], "wb") as f:
    f.write(bytes(range(256)) * 64 + b"\\r\\n\\n")
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""

RECORDING = bytes(range(256)) * 64 + b"\r\n\n"


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def lab(tmp_path: Path):
    """Runs vagrant/run against the fake vagrant; returns (rc, stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "vagrant", FAKE_VAGRANT)
    _executable(bin_dir / "memtrace", FAKE_MEMTRACE.format(python=sys.executable))
    _executable(bin_dir / "sudo", '#!/bin/sh\nexec "$@"\n')
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "vagrant.log"),
        FAKE_ARGV=str(tmp_path / "argv.json"),
        FAKE_GUEST=str(tmp_path / "guest"),
        FAKE_STATE="running",
        MEMTRACE_RECORDINGS=str(tmp_path / "host"),
    )
    env.pop("MEMTRACE_SYNC", None)

    class Lab:
        host = tmp_path / "host"
        guest = tmp_path / "guest"

        def run(self, *args: str, **overrides: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(RUN), *args], env={**env, **overrides},
                capture_output=True, text=True, timeout=60,
            )

        def calls(self) -> list[str]:
            log = tmp_path / "vagrant.log"
            return log.read_text().splitlines() if log.exists() else []

        def memtrace_argv(self) -> list[str]:
            return json.loads((tmp_path / "argv.json").read_text())

    return Lab()


def test_run_records_in_the_vm_and_copies_the_recording_back(lab) -> None:
    done = lab.run("arena-retention", "--vm-probes", "kprobe", "--", "--trim", "--mib", "8")
    assert done.returncode == 0, done.stderr
    argv = lab.memtrace_argv()
    guest_file = argv[argv.index("--record") + 1]
    assert argv[:2] == ["demo", "arena-retention"]
    assert argv[argv.index("--record") + 2:] == ["--vm-probes", "kprobe", "--", "--trim", "--mib", "8"]
    name = Path(guest_file).name
    assert name.startswith("arena-retention-") and name.endswith(".memtrace")
    assert (lab.host / name).read_bytes() == RECORDING
    assert not list(lab.host.glob(".*partial"))
    assert "rsync memtrace" in lab.calls()


def test_run_starts_a_stopped_vm_and_passes_memtrace_failures_on(lab) -> None:
    done = lab.run("leak", FAKE_STATE="poweroff", FAKE_RC="3")
    assert done.returncode == 3
    assert any(call.startswith("up memtrace") for call in lab.calls())
    assert lab.memtrace_argv()[:2] == ["demo", "leak"]
    # What was recorded before the failure still comes home.
    assert [p.read_bytes() for p in lab.host.glob("leak-*.memtrace")] == [RECORDING]


def test_run_leaves_a_shared_folder_recording_in_place(lab) -> None:
    shared = lab.guest / "recordings"
    done = lab.run("threads", MEMTRACE_RECORDINGS=str(shared), MEMTRACE_SYNC="virtualbox")
    assert done.returncode == 0, done.stderr
    assert not any(" cat " in f" {call} " for call in lab.calls())
    assert "rsync memtrace" not in lab.calls()
    assert [p.read_bytes() for p in shared.glob("threads-*.memtrace")] == [RECORDING]


@pytest.mark.parametrize("name", ["", "Threads", "x;reboot", "../x"])
def test_run_refuses_a_bad_name_before_touching_the_vm(lab, name: str) -> None:
    done = lab.run(name)
    assert done.returncode == 2
    assert lab.calls() == []
