"""What the kernel says about the traced process over netlink, with no
probe: its execs and its exit (the proc connector) and its peak RSS when it
exits (taskstats).

The kernel keeps each mm's high-water RSS, but apart from /proc/PID/status
(gone with the process) only taskstats reports it: on request for a live
task, and at each thread's exit to listeners registered per CPU. That is how
the peak of a process that gave its memory back before exiting is known.

Both sockets are plain non-blocking sockets the caller select()s on;
pyroute2 encodes the requests and decodes the messages. Its socket classes
went from threads (0.7) to asyncio (0.9); its message classes did not.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Literal, Optional, TypeVar

from memtrace.errors import MemtraceError

try:
    import pyroute2
    from pyroute2.netlink import (
        CTRL_CMD_GETFAMILY,
        GENL_ID_CTRL,
        NETLINK_CONNECTOR,
        NETLINK_GENERIC,
        NLM_F_ACK,
        NLM_F_REQUEST,
        NLMSG_DONE,
        NLMSG_ERROR,
        ctrlmsg,
    )
    from pyroute2.netlink.taskstats import TASKSTATS_CMD_GET, taskstatsmsg, tcmd
except ImportError as e:  # a broken install should cost this feature, not the trace
    pyroute2 = None
    _NO_PYROUTE2 = f"pyroute2 is not importable ({e}): pip install 'pyroute2>=0.7.4'"
else:
    _NO_PYROUTE2 = ""

try:
    from pyroute2.netlink.connector.cn_proc import (
        CN_IDX_PROC,
        CN_VAL_PROC,
        PROC_CN_MCAST_IGNORE,
        PROC_CN_MCAST_LISTEN,
        PROC_EVENT_EXEC,
        PROC_EVENT_FORK,
        PROC_EVENT_EXIT,
        PROC_EVENT_NONE,
        ProcEventMarshal,
        proc_event_control,
    )
except ImportError:  # pyroute2 < 0.7.4
    ProcEventMarshal = None

# Both sockets hear the whole machine (every exec and exit, and a taskstats
# record per exiting thread) and the kernel drops what does not fit while
# we are not reading: this leaves thousands of messages of slack, and costs
# memory only when used.
RCVBUF_BYTES = 8 << 20
# How long opening (and each query) waits for the kernel's answer.
ANSWER_TIMEOUT_S = 1.0
# One message per datagram, each under 1 KiB.
RECV_BYTES = 64 << 10

_TASKSTATS_EPERM = "taskstats needs CAP_NET_ADMIN in the initial user namespace: run memtrace as root"

_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, portid
_ERRNO = struct.Struct("=i")  # nlmsgerr.error, and proc_event's ack.err
_CN_MSG_ACK_OFFSET = 28  # cn_msg.ack, after the netlink header, id and seq
_CN_PROC_ACK_ERR_OFFSET = 52  # proc_event.event_data.ack.err
_PROC_EVENT_WHAT_OFFSET = 36  # proc_event.what, after the netlink header and cn_msg
_PROC_EVENT_DATA_OFFSET = 52  # proc_event.event_data, after what, cpu and the timestamp
# In event_data: fork's parent_tgid, exec's and exit's process_tgid (the
# same place), fork's child_tgid (a new thread's parent is its process's
# parent), and exit's parent_tgid.
_OWNER_TGID_OFFSET = _PROC_EVENT_DATA_OFFSET + 4
_FORK_CHILD_TGID_OFFSET = _PROC_EVENT_DATA_OFFSET + 12
_EXIT_PARENT_TGID_OFFSET = _PROC_EVENT_DATA_OFFSET + 20
SO_ATTACH_FILTER = 26
# A taskstats record's layout (linux/taskstats.h): after the netlink header
# (type at byte 4) and the generic one, the first nest and its first
# attribute's value.
_NLMSG_TYPE_OFFSET = 4
_FIRST_NEST_OFFSET = 20
_TASK_PID_OFFSET = 28
TASKSTATS_TYPE_AGGR_TGID = 5
# Classic BPF, for the sockets' filters: loads, jumps and returns.
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_W_IND, _LD_H_IND = 0x40, 0x48
_ALU_ADD_K, _ALU_AND_K, _ALU_LSH_K, _ALU_OR_X = 0x04, 0x54, 0x64, 0x4C
_TAX = 0x07
_JEQ_K = 0x15
_RET_K = 0x06
_KEEP, _DROP = 0xFFFFFFFF, 0


@dataclass(frozen=True)
class ProcEvent:
    """One thing the traced process, or one of its threads, did.

    kind: "exec" (it replaced its image), "thread-exit" (one thread ended,
    the leader too when other threads still run), "exit" (its last thread
    ended: the process is gone), "child" (it started a process, `tid` its
    pid, or one it started exec'd: a process memtrace does not trace).
    ts_ns: when, in the kernel's CLOCK_MONOTONIC (time.monotonic_ns()).
    exit_code: the code it exited with; exit_signal: the signal that killed
    it instead (the other one is None).
    argv: for "exec", the new command line, read from /proc when the event
    is read (empty if the process is gone by then); for "child", the
    child's, as the fork left it or as its exec made it.
    """

    kind: Literal["exec", "exit", "thread-exit", "child"]
    pid: int
    tid: int
    ts_ns: int
    exit_code: Optional[int] = None
    exit_signal: Optional[int] = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskMemory:
    """High-water marks of a task's memory (its mm's, shared by its threads)."""

    pid: int
    hiwater_rss_bytes: int  # peak resident set
    hiwater_vm_bytes: int  # peak virtual size


class _Unavailable(Exception):
    """A netlink source cannot be used; str() is the one-line reason."""


class _Refused(_Unavailable):
    """The kernel answered a request with an error."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(err)}")
        self.errno = err


def _pyroute2_version() -> str:
    version = getattr(pyroute2, "__version__", "unknown")
    return "(version unknown)" if version == "unknown" else version  # Debian's says "unknown"


def _split(datagram: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, message) for each netlink message in a datagram."""
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(datagram):
        length, msg_type, _, seq, _ = _NLMSG_HEADER.unpack_from(datagram, offset)
        if length < _NLMSG_HEADER.size:
            return
        yield msg_type, seq, datagram[offset : offset + length]
        offset += (length + 3) & ~3


def _encode(msg: Any, msg_type: int, flags: int, seq: int) -> bytes:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def _open_socket(protocol: int, groups: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    # SO_RCVBUFFORCE (root) passes net.core.rmem_max; SO_RCVBUF is capped by it.
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RCVBUF_BYTES)
            break
        except OSError:
            continue
    sock.bind((0, groups))
    return sock


T = TypeVar("T")


def _wait_answer(sock: socket.socket, answer: Callable[[bytes], Optional[T]], what: str) -> T:
    """Read datagrams until answer(datagram) is not None, for up to
    ANSWER_TIMEOUT_S. The socket is left non-blocking."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Unavailable(f"no answer from the kernel to {what} within {ANSWER_TIMEOUT_S:g}s")
            sock.settimeout(left)
            try:
                datagram = sock.recv(RECV_BYTES)
            except socket.timeout:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # others' messages overflowed it; ours may follow
                    continue
                raise _Unavailable(f"{what}: {e.strerror}") from None
            found = answer(datagram)
            if found is not None:
                return found
    finally:
        sock.setblocking(False)


def _possible_cpus() -> str:
    """The CPU list taskstats accepts (it refuses CPUs that cannot exist)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return f.read().strip()
    except OSError:
        return f"0-{(os.cpu_count() or 1) - 1}"


def _live_threads(pid: int) -> set[int]:
    """The threads of process `pid` that have yet to exit: all it lists but
    a zombie leader (one that ended before the others)."""
    try:
        tids = {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError, ValueError):
        return set()
    if state in ("Z", "X"):
        tids.discard(pid)
    return tids


def _read_argv(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ()
    return tuple(arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1])


# ---------------------------------------------------------------- proc connector


def _be32(value: int) -> int:
    """A host-order u32 as a classic BPF load reads it (big-endian)."""
    return struct.unpack(">I", struct.pack("=I", value & 0xFFFFFFFF))[0]


def _be16(value: int) -> int:
    return struct.unpack(">H", struct.pack("=H", value & 0xFFFF))[0]


def _assemble(lines: list[Any]) -> list[tuple[int, int, int, int]]:
    """Classic BPF from instructions and labels: a jump names the label
    (a string in the list) it goes to, or 0 for the next instruction."""
    at: dict[str, int] = {}
    program = []
    for line in lines:
        if isinstance(line, str):
            at[line] = len(program)
        else:
            program.append(line)

    def jump(target: Any, i: int) -> int:
        return at[target] - i - 1 if isinstance(target, str) else target

    return [(code, jump(jt, i), jump(jf, i), k) for i, (code, jt, jf, k) in enumerate(program)]


def _attach_filter(sock: socket.socket, lines: list[Any]) -> None:
    """A classic BPF filter on the socket: what it drops never wakes us.
    Refused (an old kernel, a seccomp policy), everything still comes and
    is sorted by the reader."""
    program = _assemble(lines)
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        pass


class _ProcConnector:
    """Exec and exit events of every process (NETLINK_CONNECTOR, CN_IDX_PROC)."""

    def __init__(self) -> None:
        if pyroute2 is None:
            raise _Unavailable(_NO_PYROUTE2)
        if ProcEventMarshal is None:
            raise _Unavailable(
                f"pyroute2 {_pyroute2_version()} cannot decode the proc connector "
                "(pyroute2.netlink.connector.cn_proc came in 0.7.4): pip install 'pyroute2>=0.7.4'"
            )
        try:
            self.sock = _open_socket(NETLINK_CONNECTOR, groups=CN_IDX_PROC)
        except OSError as e:
            raise _Unavailable(f"cannot open a proc connector socket: {e.strerror}") from None
        self.backlog: list[bytes] = []  # events read while waiting for the subscription
        try:
            self._subscribe()
        except BaseException:
            self.sock.close()
            raise

    def _control(self, action: int, ack: int) -> None:
        msg = proc_event_control()
        msg["idx"], msg["val"] = CN_IDX_PROC, CN_VAL_PROC
        msg["ack"] = ack
        # The bare operation, no event-type filter: kernels before 6.6
        # ignore a control message of any other size.
        msg["len"] = 4
        msg["action"] = action
        self.sock.send(_encode(msg, NLMSG_DONE, 0, 0))

    def _subscribe(self) -> None:
        # The kernel answers on the multicast group, so other listeners'
        # answers reach us too: ours echoes our number plus one.
        token = random.randrange(1, 1 << 31)

        def our_ack(datagram: bytes) -> Optional[int]:
            for _, _, raw in _split(datagram):
                if len(raw) < _CN_PROC_ACK_ERR_OFFSET + 4 or self._what(raw) != PROC_EVENT_NONE:
                    continue
                (ack,) = struct.unpack_from("=I", raw, _CN_MSG_ACK_OFFSET)
                if ack == token + 1:
                    return _ERRNO.unpack_from(raw, _CN_PROC_ACK_ERR_OFFSET)[0]
            self.backlog.append(datagram)
            return None

        try:
            self._control(PROC_CN_MCAST_LISTEN, token)
        except OSError as e:
            raise _Unavailable(f"cannot subscribe to the proc connector: {e.strerror}") from None
        try:
            err = _wait_answer(self.sock, our_ack, "the proc connector subscription")
        except _Unavailable as e:
            raise _Unavailable(f"{e} (it answers only in the initial user and pid namespaces)") from None
        if err == errno.EPERM:
            raise _Unavailable("the proc connector needs CAP_NET_ADMIN: run memtrace as root")
        if err:
            raise _Unavailable(f"the proc connector refused the subscription: {os.strerror(err)}")

    def keep_only(self, pid: int) -> None:
        """From now on, only the events that concern process pid reach the
        socket: its new threads, its exec and exits, the processes it
        starts and their exits, and every exec (a child's: the set of its
        children changes, the filter does not). The kernel tells the whole
        machine every fork and exit, and each one woke memtrace on a busy
        build machine. A classic BPF filter on the socket; without one
        (refused), every event still comes, and is sorted here."""
        program = [
            (_LD_W_ABS, 0, 0, _OWNER_TGID_OFFSET),
            (_JEQ_K, "keep", 0, _be32(pid)),  # its exec or exit, or a process it started
            (_LD_W_ABS, 0, 0, _PROC_EVENT_WHAT_OFFSET),
            (_JEQ_K, "keep", 0, _be32(PROC_EVENT_EXEC)),  # any exec (a child's)
            (_JEQ_K, "keep", 0, _be32(PROC_EVENT_NONE)),  # an answer (ack)
            (_JEQ_K, 0, "exit", _be32(PROC_EVENT_FORK)),
            (_LD_W_ABS, 0, 0, _FORK_CHILD_TGID_OFFSET),
            (_JEQ_K, "keep", "drop", _be32(pid)),  # a thread of its own, or another's fork
            "exit",
            (_JEQ_K, 0, "drop", _be32(PROC_EVENT_EXIT)),  # neither fork nor exit
            (_LD_W_ABS, 0, 0, _EXIT_PARENT_TGID_OFFSET),
            (_JEQ_K, "keep", "drop", _be32(pid)),  # the exit of a process it started
            "keep",
            (_RET_K, 0, 0, _KEEP),
            "drop",
            (_RET_K, 0, 0, _DROP),
        ]
        _attach_filter(self.sock, program)

    @staticmethod
    def _what(raw: bytes) -> int:
        return struct.unpack_from("=I", raw, ProcEventMarshal.key_offset)[0]

    def decode(self, datagram: bytes) -> Iterator[Any]:
        """The fork, exec and exit events in a datagram, decoded by pyroute2."""
        for _, _, raw in _split(datagram):
            if len(raw) < ProcEventMarshal.key_offset + 4:
                continue
            what = self._what(raw)
            if what in (PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT):
                event = ProcEventMarshal.msg_map[what](raw)
                event.decode()
                yield event

    def close(self) -> None:
        try:
            self._control(PROC_CN_MCAST_IGNORE, 0)
        except OSError:
            pass  # the kernel counts listeners per subscription; a lost IGNORE only costs it work
        self.sock.close()


# ---------------------------------------------------------------- taskstats


class _Taskstats:
    """A generic netlink socket talking to the TASKSTATS family."""

    def __init__(self) -> None:
        if pyroute2 is None:
            raise _Unavailable(_NO_PYROUTE2)
        try:
            self.sock = _open_socket(NETLINK_GENERIC)
        except OSError as e:
            raise _Unavailable(f"cannot open a generic netlink socket: {e.strerror}") from None
        self.backlog: list[bytes] = []  # exit records read while waiting for an answer
        # A random start keeps our sequence numbers apart from the exit
        # records', which count per CPU from boot.
        self._seq = random.randrange(1 << 20, 1 << 30)
        try:
            self.family = self._resolve_family()
        except BaseException:
            self.sock.close()
            raise

    def request(self, msg: Any, msg_type: int, what: str) -> list[bytes]:
        """Send msg, wait for the kernel's acknowledgement, and return the
        messages that answered it before. Raises _Refused on an error."""
        self._seq += 1
        seq = self._seq
        answered: list[bytes] = []

        def acknowledged(datagram: bytes) -> Optional[int]:
            ours = [(t, raw) for t, s, raw in _split(datagram) if s == seq]
            if not ours:
                self.backlog.append(datagram)
            for msg_type_, raw in ours:
                if msg_type_ == NLMSG_ERROR:
                    return -_ERRNO.unpack_from(raw, _NLMSG_HEADER.size)[0]
                answered.append(raw)
            return None

        try:
            self.sock.send(_encode(msg, msg_type, NLM_F_REQUEST | NLM_F_ACK, seq))
        except OSError as e:
            raise _Refused(e.errno or errno.EIO, what) from None
        err = _wait_answer(self.sock, acknowledged, what)
        if err:
            raise _Refused(err, what)
        return answered

    def _resolve_family(self) -> int:
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"] = [["CTRL_ATTR_FAMILY_NAME", "TASKSTATS"]]
        try:
            answer = self.request(msg, GENL_ID_CTRL, "the TASKSTATS family lookup")
        except _Refused as e:
            if e.errno == errno.ENOENT:
                raise _Unavailable(
                    "the kernel has no TASKSTATS generic netlink family (built without CONFIG_TASKSTATS)"
                ) from None
            raise
        for raw in answer:
            reply = ctrlmsg(raw)
            reply.decode()
            family = reply.get_attr("CTRL_ATTR_FAMILY_ID")
            if family:
                return int(family)
        raise _Unavailable("the TASKSTATS family lookup returned no family id")

    def command(self, attr: str, value: Any, what: str) -> list[bytes]:
        msg = tcmd()
        msg["cmd"] = TASKSTATS_CMD_GET  # registering a listener is a GET too
        msg["version"] = 1
        msg["attrs"] = [[attr, value]]
        return self.request(msg, self.family, what)

    def records(self, datagram: bytes) -> Iterator[tuple[int, Optional[int], Any]]:
        """(pid, tgid, stats) per taskstats record: a thread's exit, or the
        answer to a query. tgid is None except on the record the last thread
        of a multi-threaded group sends, which carries the group's aggregate
        too (whose memory fields the kernel leaves at zero)."""
        for msg_type, _, raw in _split(datagram):
            if msg_type != self.family:
                continue
            msg = taskstatsmsg(raw)
            msg.decode()
            per_pid = msg.get_attr("TASKSTATS_TYPE_AGGR_PID")
            if per_pid is None:
                continue
            per_tgid = msg.get_attr("TASKSTATS_TYPE_AGGR_TGID")
            tgid = per_tgid.get_attr("TASKSTATS_TYPE_TGID") if per_tgid is not None else None
            yield per_pid.get_attr("TASKSTATS_TYPE_PID"), tgid, per_pid.get_attr("TASKSTATS_TYPE_STATS")

    def keep_only(self, pid: int) -> None:
        """From now on, of the exit records only those that can carry the
        process's high-water marks reach the socket: its leader's, and the
        last thread's of its group (which adds the group's record). The
        kernel sends a listener one for every thread that exits on the
        machine, and pyroute2 takes ~40 us to decode each. Anything that is
        not an exit record (an answer to a request) still comes.

        A record: the netlink and generic netlink headers (20 bytes), then
        the AGGR_PID nest, whose first attribute is the task's pid (at
        byte 28), and whose length depends on the kernel's struct
        taskstats; then, on the group's last record, the AGGR_TGID nest,
        whose first attribute is the tgid."""
        program = [
            (_LD_H_ABS, 0, 0, _NLMSG_TYPE_OFFSET),
            (_JEQ_K, 0, "keep", _be16(self.family)),  # not an exit record
            (_LD_W_ABS, 0, 0, _TASK_PID_OFFSET),
            (_JEQ_K, "keep", 0, _be32(pid)),  # the leader's
            (_LD_B_ABS, 0, 0, _FIRST_NEST_OFFSET + 1),  # the nest's length, little-endian
            (_ALU_LSH_K, 0, 0, 8),
            (_TAX, 0, 0, 0),
            (_LD_B_ABS, 0, 0, _FIRST_NEST_OFFSET),
            (_ALU_OR_X, 0, 0, 0),
            (_ALU_ADD_K, 0, 0, 3),  # attributes start on 4-byte boundaries
            (_ALU_AND_K, 0, 0, 0xFFFFFFFC),
            (_TAX, 0, 0, 0),
            # Past the end of a record without a second nest, a load drops it.
            (_LD_H_IND, 0, 0, _FIRST_NEST_OFFSET + 2),  # the next nest's type
            (_JEQ_K, 0, "drop", _be16(TASKSTATS_TYPE_AGGR_TGID)),
            (_LD_W_IND, 0, 0, _TASK_PID_OFFSET),  # its first attribute: the tgid
            (_JEQ_K, "keep", "drop", _be32(pid)),  # the group's last record
            "keep",
            (_RET_K, 0, 0, _KEEP),
            "drop",
            (_RET_K, 0, 0, _DROP),
        ]
        _attach_filter(self.sock, program)

    def close(self) -> None:
        self.sock.close()


def _memory(pid: int, stats: Any) -> TaskMemory:
    """The high-water marks in a stats record (KiB in the kernel's struct).
    A record whose ac_pid is not its pid was decoded with the wrong layout:
    struct taskstats version 15 (Linux 6.16 and 6.17) moved fields, which
    pyroute2 before 0.9 does not know."""
    if stats is None or stats["ac_pid"] != pid:
        version = stats["version"] if stats is not None else "unknown"
        raise _Unavailable(
            f"pyroute2 {_pyroute2_version()} misreads this kernel's taskstats records "
            f"(struct version {version}): pip install -U pyroute2"
        )
    return TaskMemory(pid, stats["hiwater_rss"] * 1024, stats["hiwater_vm"] * 1024)


def task_memory(pid: int) -> TaskMemory:
    """High-water marks so far of a live task (TASKSTATS_CMD_GET). Needs
    CAP_NET_ADMIN. Raises MemtraceError."""
    try:
        taskstats = _Taskstats()
    except _Unavailable as e:
        raise MemtraceError(f"cannot query taskstats: {e}") from None
    try:
        answer = taskstats.command("TASKSTATS_CMD_ATTR_PID", pid, f"the taskstats query of pid {pid}")
        for raw in answer:
            for record_pid, _, stats in taskstats.records(raw):
                if record_pid == pid:
                    return _memory(pid, stats)
        raise MemtraceError(f"taskstats sent no record for pid {pid}")
    except _Refused as e:
        if e.errno == errno.ESRCH:
            raise MemtraceError(f"no process {pid}: it has exited or never existed") from None
        if e.errno == errno.EPERM:
            raise MemtraceError(_TASKSTATS_EPERM) from None
        raise MemtraceError(f"cannot query taskstats: {e}") from None
    except _Unavailable as e:
        raise MemtraceError(f"cannot query taskstats: {e}") from None
    finally:
        taskstats.close()


# ---------------------------------------------------------------- the watch


class ProcessWatch:
    """The execs, thread exits and exit of one process, and its peak RSS.

    Open it before the process can exit (a launched one while it is held
    stopped). It never raises on netlink trouble: what cannot be had is
    off, `available` says whether all works and `reason` why not.

        with ProcessWatch(pid) as watch:
            while not watch.exited:
                select.select(watch.filenos(), [], [], 1.0)
                for event in watch.read(): ...
            watch.peak_rss_bytes

    peak_rss_bytes and peak_vm_bytes are the highest the process's memory
    reached, from the taskstats records its threads send as they exit; None
    until the first one came, final once `exited`. An exec starts a new mm
    with new marks: an image that exec'ed counts only if one of its threads
    exited (an exec from a thread other than the leader).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exit_event: Optional[ProcEvent] = None
        self.peak_rss_bytes: Optional[int] = None
        self.peak_vm_bytes: Optional[int] = None
        self.overflows = 0  # times the kernel dropped messages we read too late
        self._reasons: dict[str, str] = {}
        # Threads whose exit is still to come: the process has exited once
        # the last one has. (A thread leaves /proc a moment before its exit
        # event is sent, so /proc alone cannot tell when that is.)
        self._threads: set[int] = set()
        self._children: set[int] = set()  # processes it started, for their execs
        self._last_exit: Optional[ProcEvent] = None
        self._cpus = _possible_cpus()
        self._events: Optional[_ProcConnector] = None
        self._taskstats: Optional[_Taskstats] = None
        try:
            self._events = _ProcConnector()
            self._events.keep_only(pid)
            # Listed after subscribing: a thread started since is both
            # listed and announced, one gone since is neither.
            self._threads = _live_threads(pid)
        except _Unavailable as e:
            self._reasons["events"] = f"no exec/exit events: {e}"
        try:
            self._taskstats = _Taskstats()
            self._taskstats.command(
                "TASKSTATS_CMD_ATTR_REGISTER_CPUMASK", self._cpus, "the taskstats listener registration"
            )
            self._taskstats.keep_only(pid)
        except _Unavailable as e:
            if self._taskstats is not None:
                self._taskstats.close()
                self._taskstats = None
            if isinstance(e, _Refused) and e.errno == errno.EPERM:
                e = _Unavailable(_TASKSTATS_EPERM)
            elif isinstance(e, _Refused) and e.errno == errno.EINVAL:
                e = _Unavailable(f"{e} (taskstats takes listeners only from the initial pid namespace)")
            self._reasons["taskstats"] = f"no peak RSS at exit: {e}"

    @property
    def available(self) -> bool:
        return not self._reasons

    @property
    def reason(self) -> str:
        """Why something is off, in one line; empty when all works."""
        return "; ".join(self._reasons.values())

    @property
    def events_available(self) -> bool:
        return self._events is not None

    @property
    def peak_rss_available(self) -> bool:
        return self._taskstats is not None

    @property
    def exited(self) -> bool:
        return self.exit_event is not None

    def filenos(self) -> list[int]:
        """The descriptors to select() on for read()."""
        return [s.sock.fileno() for s in (self._events, self._taskstats) if s is not None]

    def read(self) -> list[ProcEvent]:
        """The process's events since the last call, oldest first. Never blocks."""
        overflows = self.overflows
        events = self._read_events()
        if self.overflows != overflows and self._events is not None and not self.exited:
            # Some events were dropped: start over from what /proc shows.
            self._threads = _live_threads(self.pid)
            if not self._threads:
                last = self._last_exit or ProcEvent("thread-exit", self.pid, self.pid, time.monotonic_ns())
                self.exit_event = replace(last, kind="exit")
                events.append(self.exit_event)
        # Each thread sends its taskstats record before its exit event, so
        # reading taskstats second leaves no record of a reported exit unread.
        self._read_taskstats()
        return events

    def _drain(self, source: Any, name: str) -> tuple[list[bytes], bool]:
        """Every datagram waiting, and whether the socket still works."""
        datagrams, source.backlog = source.backlog, []
        while True:
            try:
                datagrams.append(source.sock.recv(RECV_BYTES))
            except BlockingIOError:
                return datagrams, True
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel dropped messages; the rest is readable
                    self.overflows += 1
                    continue
                self._reasons[name] = f"the netlink {name} socket failed: {e.strerror}"
                source.close()
                return datagrams, False

    def _read_events(self) -> list[ProcEvent]:
        source = self._events
        if source is None:
            return []
        datagrams, working = self._drain(source, "events")
        if not working:
            self._events = None
        out: list[ProcEvent] = []
        for datagram in datagrams:
            try:
                decoded = list(source.decode(datagram))
            except Exception:  # noqa: BLE001 - pyroute2's decode errors vary by version: skip the datagram
                continue
            for event in decoded:
                mine = self._mine(event)
                if mine is not None:
                    out.append(mine)
        return out

    def _mine(self, event: Any) -> Optional[ProcEvent]:
        if event["what"] == PROC_EVENT_FORK:
            if event["child_tgid"] == self.pid and event["child_pid"] != self.pid:  # a new thread
                self._threads.add(event["child_pid"])
            elif event["parent_tgid"] == self.pid and event["child_pid"] == event["child_tgid"]:
                child = event["child_tgid"]  # a new process
                self._children.add(child)
                return ProcEvent("child", self.pid, child, event["timestamp_ns"], argv=_read_argv(child))
            return None
        if event["process_tgid"] in self._children:
            child = event["process_tgid"]
            if event["what"] == PROC_EVENT_EXIT:
                if event["process_pid"] == child:
                    self._children.discard(child)
                return None
            return ProcEvent("child", self.pid, child, event["timestamp_ns"], argv=_read_argv(child))
        if event["process_tgid"] != self.pid:
            return None
        tid, ts = event["process_pid"], event["timestamp_ns"]
        if event["what"] == PROC_EVENT_EXEC:
            # The other threads are gone. (An exec from one of them killed
            # the leader, whose exit event may come late, with the execing
            # thread's old tid: the two swap tids.)
            self._threads = {self.pid}
            return ProcEvent("exec", self.pid, tid, ts, argv=_read_argv(self.pid))
        status = event["exit_code"]  # a wait(2) status
        if os.WIFSIGNALED(status):
            code, signal = None, os.WTERMSIG(status)
        else:
            code, signal = os.WEXITSTATUS(status), None
        self._threads.discard(tid)
        # The leader is often not the last thread of its group to go.
        kind: Literal["exit", "thread-exit"] = "thread-exit" if self._threads or self.exited else "exit"
        self._last_exit = ProcEvent(kind, self.pid, tid, ts, code, signal)
        if kind == "exit":
            self.exit_event = self._last_exit
        return self._last_exit

    def _read_taskstats(self) -> None:
        source = self._taskstats
        if source is None:
            return
        datagrams, working = self._drain(source, "taskstats")
        if not working:
            self._taskstats = None
        for datagram in datagrams:
            try:
                records = list(source.records(datagram))
            except Exception:  # noqa: BLE001 - as above
                continue
            for pid, tgid, stats in records:
                # The leader's record, or the group's last one: both hold the
                # shared mm's high-water marks as of that thread's exit.
                if pid != self.pid and tgid != self.pid:
                    continue
                try:
                    memory = _memory(pid, stats)
                except _Unavailable as e:
                    self._reasons["taskstats"] = f"no peak RSS at exit: {e}"
                    continue
                self.peak_rss_bytes = max(self.peak_rss_bytes or 0, memory.hiwater_rss_bytes)
                self.peak_vm_bytes = max(self.peak_vm_bytes or 0, memory.hiwater_vm_bytes)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._taskstats is not None:
            try:
                self._taskstats.command(
                    "TASKSTATS_CMD_ATTR_DEREGISTER_CPUMASK", self._cpus, "the taskstats deregistration"
                )
            except _Unavailable:
                pass  # the kernel also drops a listener once its socket is gone
            self._taskstats.close()
            self._taskstats = None

    def __enter__(self) -> ProcessWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
