"""Separate debug files: where the names of a stripped file's functions are.

Looked for the way gdb and elfutils do: by build id under
/usr/lib/debug/.build-id/xx/yyyy.debug, then by the file's .gnu_debuglink
(next to the file, in its .debug/, under /usr/lib/debug/ + its directory),
in the traced process's root and in ours; a file found by name counts only
when its CRC-32 matches the link's, one found by build id when its build
id does. Else, when DEBUGINFOD_URLS is set, it is fetched from a debuginfod
server by build id, in a background thread, into elfutils' own cache, so
the live view never waits for the network: frames get their names when
the file has arrived."""

from __future__ import annotations

import os
import queue
import threading
import time
import urllib.error
import urllib.request
import zlib
from typing import Optional

from memtrace.symbols.elf import ElfSymbols, FunctionSymbol, debug_file_names
from memtrace.process.mappedfile import open_in_root

DEBUG_DIR = "/usr/lib/debug"
# Debug files are big (libjvm's is hundreds of MiB) but only their .symtab
# is read; a bigger one is left alone.
MAX_DEBUG_FILE_BYTES = 4 << 30
DEFAULT_TIMEOUT_S = 90  # elfutils' default for DEBUGINFOD_TIMEOUT


def attach_debug_names(elf: ElfSymbols, module_path: str, root: str) -> bool:
    """Add the names of a local debug file of `elf` (mapped as
    `module_path` by a process whose root directory is `root`). Whether
    one was found. Looked for once per file."""
    if elf.debug_checked:
        return False
    elf.debug_checked = True
    found = find_debug_file(elf, module_path, root)
    if found is None:
        return False
    names, source = found
    elf.add_names(names, source)
    return True


def find_debug_file(elf: ElfSymbols, module_path: str, root: str
                    ) -> Optional[tuple[list[FunctionSymbol], str]]:
    """(function symbols, where from) of the first matching debug file."""
    roots = list(dict.fromkeys((root, "/")))
    if elf.build_id and len(elf.build_id) > 2:
        relative = f"{DEBUG_DIR}/.build-id/{elf.build_id[:2]}/{elf.build_id[2:]}.debug"
        for where in roots:
            names = _read_debug_file(where, relative, build_id=elf.build_id)
            if names:
                return names, relative
    if elf.debuglink:
        name, crc = elf.debuglink
        if "/" in name or name in ("", ".", ".."):
            return None  # a link is a bare file name
        directory = os.path.dirname(module_path)
        for relative in (f"{directory}/{name}", f"{directory}/.debug/{name}",
                         f"{DEBUG_DIR}{directory}/{name}"):
            if relative == module_path:
                continue
            for where in roots:
                names = _read_debug_file(where, relative, crc=crc)
                if names:
                    return names, relative
    return None


def _read_debug_file(root: str, path: str, build_id: Optional[str] = None,
                     crc: Optional[int] = None) -> list[FunctionSymbol]:
    try:
        f = open_in_root(root, path, limit=MAX_DEBUG_FILE_BYTES)
    except OSError:
        return []
    with f:
        try:
            if crc is not None and _crc32(f) != crc:
                return []
            found_id, names = debug_file_names(f)
        except OSError:
            return []
    if build_id is not None and found_id != build_id:
        return []
    return names


def _crc32(f) -> int:
    crc = 0
    offset = 0
    while True:
        chunk = os.pread(f.fileno(), 1 << 20, offset)
        if not chunk:
            return crc
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)


# ---------------------------------------------------------------- debuginfod

def cache_dir() -> str:
    """Where elfutils' client keeps what it fetched: shared with gdb."""
    if os.environ.get("DEBUGINFOD_CACHE_PATH"):
        return os.environ["DEBUGINFOD_CACHE_PATH"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "debuginfod_client")


class Debuginfod:
    """Debug files by build id from the servers in DEBUGINFOD_URLS: one
    background thread fetches, the caller only asks and later collects."""

    def __init__(self, urls: list[str], cache: str, timeout_s: float) -> None:
        self.urls = urls
        self.cache = cache
        self.timeout_s = timeout_s
        self._state: dict[str, Optional[str]] = {}  # build id -> path, or None: pending or failed
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self._queue: "queue.Queue[str]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_environment(cls) -> Optional["Debuginfod"]:
        urls = [u for u in os.environ.get("DEBUGINFOD_URLS", "").split() if u.startswith(("http://", "https://"))]
        if not urls:
            return None
        try:
            timeout = float(os.environ.get("DEBUGINFOD_TIMEOUT", DEFAULT_TIMEOUT_S))
        except ValueError:
            timeout = DEFAULT_TIMEOUT_S
        return cls(urls, cache_dir(), max(1.0, timeout))

    def cached(self, build_id: str) -> Optional[str]:
        path = os.path.join(self.cache, build_id, "debuginfo")
        return path if os.path.isfile(path) else None

    def request(self, build_id: str) -> Optional[str]:
        """The cached debug file of `build_id`, else None, and it is fetched
        in the background (once) for a later finished() to report."""
        if not _is_build_id(build_id):
            return None
        path = self.cached(build_id)
        if path is not None:
            return path
        with self._lock:
            if build_id in self._state:
                return None
            self._state[build_id] = None
        self._queue.put(build_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="memtrace-debuginfod", daemon=True)
            self._thread.start()
        return None

    def result(self, build_id: str) -> tuple[bool, Optional[str]]:
        """(whether the fetch of `build_id` has ended, the debug file: None
        when no server had it)."""
        with self._lock:
            return build_id in self._done, self._state.get(build_id)

    def wait(self, build_id: str, timeout: float) -> bool:
        """Whether the fetch of `build_id` ended within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.result(build_id)[0]:
                return True
            time.sleep(0.05)
        return False

    def _work(self) -> None:
        while True:
            build_id = self._queue.get()
            path = None
            for url in self.urls:
                path = self._fetch(url.rstrip("/"), build_id)
                if path:
                    break
            with self._lock:
                self._state[build_id] = path
                self._done.add(build_id)

    def _fetch(self, url: str, build_id: str) -> Optional[str]:
        deadline = time.monotonic() + self.timeout_s
        directory = os.path.join(self.cache, build_id)
        target = os.path.join(directory, "debuginfo")
        try:
            with urllib.request.urlopen(f"{url}/buildid/{build_id}/debuginfo",
                                        timeout=min(self.timeout_s, 30)) as response:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                partial = f"{target}.{os.getpid()}.part"
                received = 0
                with open(partial, "wb") as out:
                    while True:
                        if time.monotonic() > deadline:
                            raise TimeoutError("debuginfod fetch took too long")
                        chunk = response.read(1 << 20)
                        if not chunk:
                            break
                        received += len(chunk)
                        if received > MAX_DEBUG_FILE_BYTES:
                            raise OSError("debug file too large")
                        out.write(chunk)
                os.replace(partial, target)
                return target
        except (OSError, urllib.error.URLError, ValueError, TimeoutError):
            try:
                os.unlink(f"{target}.{os.getpid()}.part")
            except OSError:
                pass
            return None


def _is_build_id(text: str) -> bool:
    return 2 < len(text) <= 128 and all(c in "0123456789abcdef" for c in text)


_client: Optional[Debuginfod] = None
_client_made = False


def client() -> Optional[Debuginfod]:
    """The one debuginfod client of this process, when DEBUGINFOD_URLS
    names a server."""
    global _client, _client_made
    if not _client_made:
        _client_made = True
        _client = Debuginfod.from_environment()
    return _client


def read_fetched(path: str, build_id: str) -> list[FunctionSymbol]:
    """The names in a debug file fetched into our cache (ours: any path)."""
    return _read_debug_file("/", path, build_id=build_id)
