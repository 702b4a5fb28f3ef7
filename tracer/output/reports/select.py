"""Which stacks an output shows, and in what order: one policy for the
live view's table, the end summary, `--json` and every report.

Stacks are ranked by a weight (live, retained or allocated bytes), then by
live and allocated bytes, then by their frames, so ties land the same way
everywhere. The user's `--top N` and `--min-size BYTES` bound what is
shown; what they leave out is counted, never silently dropped: reports say
"other (N stacks)" with the bytes those stacks hold.

The policy is the run's: the command line sets it once (`configure`), and
every output asks for it, so the view's constructors, which carry nothing
about output sizes, need no new argument.
"""

from __future__ import annotations

import argparse
import heapq
import re
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Callable, Iterable, Optional, Sequence

from memtrace.model.snapshot import Counters, Snapshot, StackStats, ThreadStats
from memtrace.model.frames import split_frame

WEIGHTS = ("live", "retained", "allocated")
_second = itemgetter(1)


@dataclass(frozen=True)
class StackPolicy:
    """The user's bounds: at most `top` stacks, none whose weight is below
    `min_bytes`. None: no bound. And the filters: only stacks that one of
    `tids`, or a thread whose name matches `thread`, allocated from; that
    have a frame in a module whose file name contains `module`; that have a
    frame whose function matches the regular expression `function`. A
    stack the filters leave out is neither shown nor counted as 'other'."""

    top: Optional[int] = None
    min_bytes: Optional[int] = None
    tids: frozenset[int] = frozenset()
    thread: Optional[str] = None
    module: Optional[str] = None
    function: Optional[str] = None

    @property
    def filtered(self) -> bool:
        return bool(self.tids) or any(x is not None for x in (self.thread, self.module, self.function))

    @property
    def bounded(self) -> bool:
        return self.top is not None or self.min_bytes is not None or self.filtered

    def words(self) -> str:
        """The filters as the command line gave them: '--module libz'."""
        parts = [f"--tid {t}" for t in sorted(self.tids)]
        parts += [f"--{name} {value}" for name, value in
                  (("thread", self.thread), ("module", self.module), ("function", self.function))
                  if value is not None]
        return " ".join(parts)


def stack_filter(policy: StackPolicy, threads: Sequence[ThreadStats] = ()) -> Optional[Callable[[StackStats], bool]]:
    """Whether a stack passes the policy's filters; None: no filter."""
    if not policy.filtered:
        return None
    tids = set(policy.tids)
    if policy.thread is not None:
        named = re.compile(policy.thread)
        tids |= {t.tid for t in threads if named.search(t.name)}
    by_thread = bool(policy.tids) or policy.thread is not None
    function = re.compile(policy.function) if policy.function is not None else None

    def frames_match(frames: Sequence[str]) -> bool:
        if policy.module is None and function is None:
            return True
        for frame in frames:
            func, module = split_frame(frame)
            if policy.module is not None and policy.module not in (module or ""):
                continue
            if function is not None and not (func and function.search(func)):
                continue
            return True
        return False

    def keep(stack: StackStats) -> bool:
        if by_thread and not tids.intersection(stack.tids):
            return False
        return frames_match(stack.frames)

    return keep


class Selection:
    """The stacks shown, heaviest first, and what the others add up to
    (summed when asked: the live view never asks)."""

    def __init__(self, shown: Sequence[tuple[StackStats, int]], others: Sequence[tuple[StackStats, int]]) -> None:
        self.shown: tuple[StackStats, ...] = tuple(s for s, _ in shown)
        self.weights: tuple[int, ...] = tuple(w for _, w in shown)  # of the shown, in order
        self._others = others

    @property
    def other_count(self) -> int:
        return len(self._others)

    @property
    def other_weight(self) -> int:
        return sum(w for _, w in self._others)

    @property
    def other_counters(self) -> Counters:
        o = [s.counters for s, _ in self._others]
        return Counters(sum(c.alloc_bytes for c in o), sum(c.free_bytes for c in o),
                        sum(c.alloc_count for c in o), sum(c.free_count for c in o))

    @property
    def other_retained_bytes(self) -> int:
        return sum(s.retained_bytes for s, _ in self._others)

    @property
    def other_label(self) -> str:
        return f"other ({self.other_count} stack{'' if self.other_count == 1 else 's'})"


_WEIGHTS = {
    "live": lambda s: s.counters.alloc_bytes - s.counters.free_bytes,
    "allocated": lambda s: s.counters.alloc_bytes,
    "retained": lambda s: s.retained_bytes,
}


def weight_of(stack: StackStats, by: str) -> int:
    try:
        return _WEIGHTS[by](stack)
    except KeyError:
        raise ValueError(f"unknown weight {by!r}") from None


def rank_key(stack: StackStats, weight: int) -> tuple:
    c = stack.counters
    return (-weight, -c.live_bytes, -c.alloc_bytes, stack.frames)


def select_stacks(
    stacks: Iterable[StackStats],
    by: str = "live",
    *,
    limit: Optional[int] = None,
    positive: bool = False,
    policy: Optional[StackPolicy] = None,
    min_share: float = 0.0,
    threads: Sequence[ThreadStats] = (),
) -> Selection:
    """The stacks to show by weight `by`, heaviest first.

    limit: rows the output has room for, on top of the policy's --top.
    positive: leave out stacks whose weight is not above zero (a flame
      graph cannot draw them); they are not counted in "other" either.
    policy: the user's bounds (--top, --min-size and the filters); none by default.
    min_share: leave out stacks below this share of the total positive
      weight (the HTML page folds them into "other").
    threads: the snapshot's, for the --thread filter's names.
    """
    policy = StackPolicy() if policy is None else policy
    if by not in WEIGHTS:
        raise ValueError(f"unknown weight {by!r}")
    weigh = _WEIGHTS[by]
    keep = stack_filter(policy, threads)
    pairs = [(s, weigh(s)) for s in stacks if keep is None or keep(s)]
    if positive:
        pairs = [p for p in pairs if p[1] > 0]
    floor = policy.min_bytes
    if min_share > 0:
        total = sum(w for _, w in pairs if w > 0)
        share_floor = min_share * total
        floor = share_floor if floor is None else max(floor, share_floor)
    if floor is not None:
        kept = [p for p in pairs if p[1] >= floor]
    else:
        kept = pairs
    bounds = [n for n in (policy.top, limit) if n is not None]
    count = min(bounds) if bounds else None
    key = lambda p: rank_key(p[0], p[1])  # noqa: E731
    if count is not None and count < len(kept):
        # A few rows out of 100,000 stacks: no full sort. The weights alone
        # find the count-th heaviest; the ties around it are ranked whole.
        if count <= 0:
            ranked = []
        else:
            cut = heapq.nlargest(count, kept, key=_second)[-1][1]
            ranked = sorted((p for p in kept if p[1] >= cut), key=key)[:count]
    else:
        ranked = sorted(kept, key=key)
    if len(ranked) == len(pairs):
        return Selection(ranked, ())
    shown_ids = {id(s) for s, _ in ranked}
    return Selection(ranked, [p for p in pairs if id(p[0]) not in shown_ids])


def snapshot_json(snapshot: Snapshot, by: str = "live", policy: Optional[StackPolicy] = None) -> dict:
    """`Snapshot.to_json()` with the stacks the policy keeps. The figures
    about all stacks (truncated counts and shares) stay those of all of
    them, and `stacks_left_out` says what the others hold. Unbounded, it is
    exactly to_json()."""
    policy = StackPolicy() if policy is None else policy
    if not policy.bounded:
        return snapshot.to_json()
    chosen = select_stacks(snapshot.stacks, by, policy=policy, threads=snapshot.threads)
    doc = replace(snapshot, stacks=chosen.shown).to_json()
    if policy.filtered:
        doc["stack_filter"] = {"options": policy.words(),
                               "stacks_matched": len(chosen.shown) + chosen.other_count}
    doc["truncated_stack_count"] = snapshot.truncated_stack_count
    doc["truncated"] = snapshot.truncated_shares()
    c = chosen.other_counters
    doc["stacks_left_out"] = {
        "count": chosen.other_count,
        "live_bytes": c.live_bytes,
        "alloc_bytes": c.alloc_bytes,
        "free_bytes": c.free_bytes,
        "alloc_count": c.alloc_count,
        "free_count": c.free_count,
        "retained_bytes": chosen.other_retained_bytes,
    }
    return doc


# ---------------------------------------------------------------- options

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '4096', '64K', '1M', '1.5GiB' (binary units, as the view
    shows sizes)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r}: give bytes, or a number with K, M, G or T (64K, 1M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def top_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid --top {text!r}: give a number of stacks, 1 or more")
    return n


def regex_arg(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {e}") from None
    return text


def add_policy_options(parser) -> None:
    parser.add_argument("--top", type=top_arg, metavar="N",
                        help="show at most N stacks, the heaviest (view, summary, JSON, reports);"
                        " the others are counted as 'other'")
    parser.add_argument("--min-size", type=size_arg, metavar="BYTES",
                        help="leave out stacks weighing less than BYTES (4096, 64K, 1M)")
    parser.add_argument("--tid", type=int, action="append", metavar="TID",
                        help="only stacks this thread allocated from (repeatable); a stack's"
                        " figures are for all of its threads")
    parser.add_argument("--thread", type=regex_arg, metavar="REGEX",
                        help="only stacks that threads whose name matches allocated from")
    parser.add_argument("--module", metavar="NAME",
                        help="only stacks with a frame in a module whose file name contains NAME (libz)")
    parser.add_argument("--function", type=regex_arg, metavar="REGEX",
                        help="only stacks with a frame whose function matches (Inflater|inflate)")


def policy_of(args: argparse.Namespace) -> StackPolicy:
    return StackPolicy(getattr(args, "top", None), getattr(args, "min_size", None),
                       frozenset(getattr(args, "tid", None) or ()), getattr(args, "thread", None),
                       getattr(args, "module", None), getattr(args, "function", None))

