"""Notes and hints: kinds and fields in the model, words in the output."""

from __future__ import annotations

from memtrace.model import notes
from memtrace.model.notes import Note
from memtrace.output import notes as words
from memtrace.output.notes import note_json, note_text

KINDS = sorted(v for k, v in vars(notes).items() if k.isupper() and isinstance(v, str))


def test_every_kind_has_its_words():
    assert KINDS and set(KINDS) <= set(words._WORDS), set(KINDS) - set(words._WORDS)


def test_words_are_one_line_whatever_the_fields_hold():
    note = Note.of(notes.EXEC, argv="python3 -c \nimport json\n")
    assert note_text(note) == "the process exec'd: python3 -c \\nimport json\\n"
    for kind in KINDS:
        text = note_text(Note.of(kind, reason="a\nb", argv="x", allocator="jemalloc", bytes=1 << 20,
                                 retained_bytes=3 << 20, resident_bytes=4 << 20, trimmable_bytes=1,
                                 arenas=2, at_s=1.0, snapshots=3, text="t", path="/p",
                                 probed_path="/q", attached=True))
        assert text and "\n" not in text, (kind, text)


def test_a_kind_from_a_newer_memtrace_is_still_shown():
    assert note_text(Note.of("future_thing", count=3)) == "future thing (count=3)"


def test_json_round_trip_and_old_sentences():
    hint = Note.of(notes.THREAD_ARENAS_RETAIN, arenas=8, retained_bytes=3 << 30, resident_bytes=4 << 30)
    assert Note.from_json(hint.to_json()) == hint
    # The JSON output's own words are not read back as a field.
    assert Note.from_json(note_json(hint)) == hint
    assert "MALLOC_ARENA_MAX=2" in note_json(hint)["text"]
    # A recording made when notes were sentences.
    old = Note.from_json("the process exec'd: ls")
    assert old.kind == notes.TEXT and note_text(old) == "the process exec'd: ls"


def test_children_not_traced_names_the_one_to_trace():
    one = note_text(Note.of(notes.CHILDREN_NOT_TRACED, count=1, pid=4242, argv="python3 app.py"))
    assert one == ("the process started a child process that memtrace does not trace: 4242 "
                   "`python3 app.py`; to see its memory, trace it with -p 4242, or have the "
                   "command exec it (sh -c 'exec ...')")
    many = note_text(Note.of(notes.CHILDREN_NOT_TRACED, count=12, pid=4250, argv="", alive=True))
    assert many.startswith("the process started 12 child processes that memtrace does not trace: "
                           "4250 (the latest); ") and "-p 4250" in many
    gone = note_text(Note.of(notes.CHILDREN_NOT_TRACED, count=6, pid=4260, argv="git repack -d",
                             alive=False))
    assert gone == ("the process started 6 child processes that memtrace does not trace: 4260 "
                    "(the latest, exited) `git repack -d`; to see a child's memory, trace that "
                    "command itself, or -p its pid while it runs")


def test_an_allocator_memtrace_does_not_know_is_named_by_its_object():
    opaque = note_text(Note.of(notes.ALLOCATOR_OPAQUE, allocator="other", attached=False,
                               path="/usr/lib/chromium/chromium"))
    assert opaque.startswith("the malloc in chromium: its statistics are kept"), opaque
    assert note_text(Note.of(notes.ALLOCATOR_OPAQUE, allocator="jemalloc")).startswith("jemalloc: ")
    changed = note_text(Note.of(notes.ALLOCATOR_CHANGED, allocator="other",
                                path="/usr/lib/chromium/chromium",
                                probed_path="/lib/x86_64-linux-gnu/libc.so.6"))
    assert changed.startswith("after the exec, malloc is the program's own "
                              "(/usr/lib/chromium/chromium), which memtrace did not probe"), changed


def test_full_unwind_tables_name_the_option_when_rows_ran_out():
    assert note_text(Note.of(notes.UNWIND_TABLES_FULL, rows=1024)).endswith(
        "; trace again with --unwind-rows 2048 (now 1024)")
    # Pages or modules ran out, or a recording from before: no option to give.
    assert note_text(Note.of(notes.UNWIND_TABLES_FULL)).endswith("without a frame pointer")


def test_memory_mapped_more_than_once_says_rss_and_pss():
    text = note_text(Note.of(notes.MAPPED_MORE_THAN_ONCE, path="/memfd:java_heap", views=3,
                             rss_bytes=1450 << 20, pss_bytes=475 << 20))
    assert text == ("RSS counts /memfd:java_heap once per address it is mapped at (3 views of the "
                    "same memory, as the JVM's ZGC maps its heap): 1.4 GiB of the RSS is 475.0 MiB "
                    "of memory (its PSS)"), text
