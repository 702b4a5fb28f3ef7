"""The built-in demos and reproductions that `memtrace demo NAME` launches.

Each demo is a small program shipped as source next to this module. It
prints its phases and its own ground truth (what it holds, per thread) to
stderr, so what memtrace shows can be checked against it, and it ends on its
own. All accept `--pause` (wait for Enter or SIGUSR1 between phases) and
`--help`.

    demo = get("threads")
    argv = demo.argv(default_cache_dir(), ["--pause"])
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from memtrace.demos.build import (
    C_FLAGS,
    C_SUPPORT,
    SOURCE_DIR,
    cached_build,
    default_cache_dir,
    digest,
    require_tool,
    run_compiler,
)
from memtrace.errors import MemtraceError

__all__ = ["DEFAULT_DEMO", "DEMOS", "Demo", "default_cache_dir", "get"]

# Bumped when the recipe changes in a way the sources and flags don't show.
_RECIPE_VERSION = b"1"


@dataclass(frozen=True)
class Demo:
    """A demo program: where its source is and how to build and start it."""

    name: str
    summary: str  # one line: what it shows
    source: str  # file name next to this module

    @property
    def runtime(self) -> str:
        """What the launched process is: "native" or "java"."""
        return "native"

    def argv(self, cache_dir: Path, options: Sequence[str] = ()) -> list[str]:
        """The command line that starts the demo, building it into
        `cache_dir` first if needed. `options` are the program's own
        arguments (e.g. ["--pause"]), appended as they are."""
        folder = cached_build(cache_dir, self.name, self._key(), self._build)
        return [*self._launch(folder), *options]

    def source_path(self) -> Path:
        return SOURCE_DIR / self.source

    def _source_bytes(self, path: Path | None = None) -> bytes:
        path = path or self.source_path()
        try:
            return path.read_bytes()
        except OSError as error:
            raise MemtraceError(
                f"demo '{self.name}' source is missing ({error.strerror}: "
                f"{path}); reinstall memtrace"
            ) from None

    def _key(self) -> str:
        return digest(self._recipe())

    def _recipe(self) -> list[bytes]:
        raise NotImplementedError

    def _build(self, folder: Path) -> None:
        raise NotImplementedError

    def _launch(self, folder: Path) -> list[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class CDemo(Demo):
    def _recipe(self) -> list[bytes]:
        return [
            _RECIPE_VERSION,
            " ".join(C_FLAGS).encode(),
            self._source_bytes(),
            self._source_bytes(SOURCE_DIR / C_SUPPORT),
        ]

    def _build(self, folder: Path) -> None:
        gcc = require_tool("gcc", "gcc", f"building demo '{self.name}'")
        run_compiler(
            [gcc, *C_FLAGS, "-o", str(folder / self.name), str(self.source_path())],
            f"demo '{self.name}'",
            folder.parent / f"{self.name}.build.log",
        )

    def _launch(self, folder: Path) -> list[str]:
        return [str(folder / self.name)]


# Frame pointers through JIT-compiled code let the tracer's stack walk cross
# Java frames; serial GC keeps the JVM's own thread count (and noise) low.
JVM_OPTIONS = ("-XX:+PreserveFramePointer", "-XX:+UseSerialGC", "-Xmx256m")

# Shared by the Java demos: their phases and --pause.
JAVA_SUPPORT = "DemoSupport.java"

# Class files for Java 11 run on any JDK the install script may bring.
JAVAC_RELEASE = "11"


@dataclass(frozen=True)
class JavaDemo(Demo):
    main_class: str = ""

    @property
    def runtime(self) -> str:
        return "java"

    def _recipe(self) -> list[bytes]:
        return [_RECIPE_VERSION, JAVAC_RELEASE.encode(), self._source_bytes(),
                self._source_bytes(SOURCE_DIR / JAVA_SUPPORT)]

    def _build(self, folder: Path) -> None:
        self._compile(folder / "classes")

    def _compile(self, classes: Path) -> None:
        javac = require_tool(
            "javac", "default-jdk-headless", f"building demo '{self.name}'"
        )
        run_compiler(
            [
                javac,
                "--release", JAVAC_RELEASE,
                "-nowarn",
                "-d", str(classes),
                str(self.source_path()),
                str(SOURCE_DIR / JAVA_SUPPORT),
            ],
            f"demo '{self.name}'",
            classes.parent.parent / f"{self.name}.build.log",
        )

    def _classpath(self, folder: Path) -> list[Path]:
        return [folder / "classes"]

    def _launch(self, folder: Path) -> list[str]:
        java = require_tool(
            "java", "default-jre-headless", f"running demo '{self.name}'"
        )
        classpath = ":".join(str(p) for p in self._classpath(folder))
        return [java, *JVM_OPTIONS, "-cp", classpath, self.main_class]


@dataclass(frozen=True)
class JarDemo(JavaDemo):
    """A Java demo packaged as jars, plus a resource jar generated at build
    time with `resource_count` entries for it to scan."""

    resource_count: int = 0

    def _recipe(self) -> list[bytes]:
        return [*super()._recipe(), str(self.resource_count).encode()]

    def _build(self, folder: Path) -> None:
        classes = folder / "classes"
        self._compile(classes)
        _write_jar(
            folder / "app.jar",
            {
                str(p.relative_to(classes)): p.read_bytes()
                for p in sorted(classes.rglob("*.class"))
            },
            main_class=self.main_class,
        )
        _write_jar(folder / "resources.jar", _resources(self.resource_count))

    def _classpath(self, folder: Path) -> list[Path]:
        return [folder / "app.jar", folder / "resources.jar"]


def _write_jar(
    path: Path, entries: dict[str, bytes], main_class: str = ""
) -> None:
    manifest = "Manifest-Version: 1.0\r\nCreated-By: memtrace\r\n"
    if main_class:
        manifest += f"Main-Class: {main_class}\r\n"
    # A fixed timestamp keeps the jar identical from build to build.
    stamp = (2024, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as jar:
        jar.writestr(zipfile.ZipInfo("META-INF/MANIFEST.MF", stamp),
                     (manifest + "\r\n").encode(), zipfile.ZIP_DEFLATED)
        for name, data in entries.items():
            jar.writestr(zipfile.ZipInfo(name, stamp), data, zipfile.ZIP_DEFLATED)


def _resources(count: int) -> dict[str, bytes]:
    """Service descriptors and templates, like a real application's jar:
    compressible text of varied size so each read inflates a real stream."""
    entries: dict[str, bytes] = {}
    for i in range(count):
        if i % 3 == 0:
            name = f"templates/page-{i:04d}.html"
            body = "".join(
                f"<div class='row-{j}'>item {i}.{j} {'x' * (j % 40)}</div>\n"
                for j in range(40 + (i * 37) % 200)
            )
        else:
            name = f"services/svc-{i:04d}.properties"
            body = "".join(
                f"service.{i}.option{j}=value-{(i * 31 + j * 17) % 997}\n"
                for j in range(20 + (i * 13) % 120)
            )
        entries[name] = body.encode()
    return entries


DEMOS: dict[str, Demo] = {
    demo.name: demo
    for demo in (
        CDemo(
            "threads",
            "named threads allocate from distinct call paths, grow, free "
            "most and keep a slowly growing leak (~15 s)",
            "threads.c",
        ),
        CDemo(
            "arena-retention",
            "threads fill per-thread glibc arenas with small blocks and free "
            "90 %: RSS stays high until malloc_trim (--trim, --arena-max N)",
            "arena_retention.c",
        ),
        JavaDemo(
            "inflater",
            "the incident: Java threads drop zlib Inflaters without end(); "
            "native windows pile up in glibc arenas until GC cleans them",
            "InflaterDemo.java",
            main_class="InflaterDemo",
        ),
        CDemo(
            "leak",
            "a true leak: one call path mallocs and never frees, growing "
            "steadily beside balanced traffic",
            "leak.c",
        ),
        JarDemo(
            "startup",
            "a service-like JVM start scanning its own jars (JarFile and "
            "ZipInputStream), traced from the first instruction",
            "StartupDemo.java",
            main_class="StartupDemo",
            resource_count=400,
        ),
    )
}

DEFAULT_DEMO = "threads"


def get(name: str) -> Demo:
    """The demo called `name`, or a MemtraceError listing the known ones."""
    try:
        return DEMOS[name]
    except KeyError:
        known = ", ".join(DEMOS)
        raise MemtraceError(
            f"no demo named '{name}': choose one of {known}"
        ) from None
