#!/usr/bin/env bash
# Install memtrace and everything it needs on Debian 12 or Ubuntu 22.04/24.04,
# then run the built-in demo. Safe to run again: each step checks first.
#
#   sudo ./install.sh                 install, then `memtrace demo`
#   sudo ./install.sh --no-demo       install only
#   sudo ./install.sh --test-tools    also what the test suite uses
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
demo=1
test_tools=0
for arg in "$@"; do
    case "$arg" in
        --no-demo) demo=0 ;;
        --test-tools) test_tools=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $*"
command -v apt-get >/dev/null || die "needs a Debian or Ubuntu system (apt-get not found)"

export DEBIAN_FRONTEND=noninteractive
kernel=$(uname -r)
arch=$(dpkg --print-architecture)

# ---------------------------------------------------------------- packages
packages=(bpfcc-tools python3-bpfcc python3-venv gcc libc6-dev default-jdk-headless)
if [ "$test_tools" -eq 1 ]; then
    packages+=(bpftool shellcheck musl-tools tmux chromium golang-go prometheus)
    # the other allocators and a real service that uses one (issue 12)
    packages+=(libjemalloc2 libjemalloc-dev libtcmalloc-minimal4 libmimalloc2.0 redis-server redis-tools tomcat10)
    # programs nobody here wrote, and the tools that name their frames (issue 11)
    packages+=(sqlite3 debuginfod elfutils binutils xz-utils)
    # a program that runs Python from libpython (its frames, like an embedding program's)
    packages+=(python3-dev)
    # a program with more unwind rows than the tables once held, and a library it dlopens
    packages+=(qemu-system-x86)
    # the reference for what real programs allocate and leak
    packages+=(heaptrack)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
apt_updated=0
apt_update() {
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    say "installing ${missing[*]}"
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Optional test tools: install what the distribution has, say what it lacks.
if [ "$test_tools" -eq 1 ]; then
    if ! dpkg-query -W -f='${Status}' vagrant 2>/dev/null | grep -q "ok installed"; then
        apt_update
        apt-get install -y -qq vagrant >/dev/null 2>&1 || say "note: vagrant is not available here"
    fi
fi

# ---------------------------------------------------------------- kernel headers
# bcc compiles BPF programs against this kernel's headers. Where the
# distribution has none for the running kernel (a custom or newer kernel),
# link the distribution's generic headers: memtrace's BPF code reads no
# kernel structs, only helpers, tracepoint fields and registers.
build="/lib/modules/$kernel/build"
if [ ! -e "$build/include" ]; then
    apt_update
    if ! apt-get install -y -qq "linux-headers-$kernel" >/dev/null 2>&1; then
        flavour_pkg="linux-headers-$arch"
        if grep -qi ubuntu /etc/os-release; then flavour_pkg=linux-headers-generic; fi
        say "no headers packaged for kernel $kernel; using $flavour_pkg"
        apt-get install -y -qq "$flavour_pkg" >/dev/null
        headers=$(find /usr/src -maxdepth 1 -name 'linux-headers-*' ! -name '*-common' \
                  ! -name '*-common-*' -type d | sort -V | tail -n 1)
        [ -n "$headers" ] || die "no kernel headers found under /usr/src after installing $flavour_pkg"
        mkdir -p "/lib/modules/$kernel"
        ln -sfn "$headers" "$build"
        # Debian splits arch-independent headers into a -common package.
        common=$(find /usr/src -maxdepth 1 -type d -name "$(basename "${headers%-*}")-common*" \
                 | sort -V | tail -n 1)
        if [ -n "$common" ]; then
            ln -sfn "$common" "/lib/modules/$kernel/source"
        fi
        say "linked $build -> $headers"
    fi
fi

# ---------------------------------------------------------------- tracefs
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null \
        || die "cannot mount tracefs on /sys/kernel/tracing (is this a container without it?)"
fi

# ---------------------------------------------------------------- venv
# Debian's bcc module lives in the system python's dist-packages: the venv
# is made from that python and sees its site-packages.
python=/usr/bin/python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "memtrace needs Python 3.10 or later as /usr/bin/python3"
"$python" -c 'import bcc' 2>/dev/null || die "python3-bpfcc installed but 'import bcc' fails"
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "$python" -m venv --system-site-packages "$venv"
fi
say "installing memtrace into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "${here}[test]"
ln -sfn "$venv/bin/memtrace" /usr/local/bin/memtrace
say "memtrace is $(command -v memtrace) ($("$venv/bin/memtrace" --version))"

if [ "$demo" -eq 1 ]; then
    say "running: memtrace demo"
    exec /usr/local/bin/memtrace demo
fi
