"""memtrace: an eBPF live memory tracer for glibc processes."""

__version__ = "0.1.0"
