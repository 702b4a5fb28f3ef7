"""Reading glibc malloc's own bookkeeping from outside the process.

Everything here reads the target through /proc (maps, smaps, mem, pagemap)
and never writes to it. The public entry point is `memtrace.process.glibc.inspect`;
these modules are its parts: `layout` (the structs), `procfs` (maps/smaps
and the memory reader), `locate` (heaps, arenas, main_arena), `freelists`
(walking the bins), `trim` (what malloc_trim(0) would give back), `arena`
(one arena, put together) and `report` (the result types).
"""
