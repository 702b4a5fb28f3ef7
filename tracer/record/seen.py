"""Which stacks of a snapshot are new since the previous one, found by
identity, for the recorder to write only those.

The collector keeps the `StackStats` object of every stack that did not
change (memtrace.collect.aggregate). Looking every stack up by its frames
(hashing ~30 strings each) and re-checking the order of all of them cost
the recorder most of half a second per interval at 100,000 stacks; the
passes here over all of them are C loops over their addresses (map, set,
dict, compress), and Python code runs only for the stacks that changed.
The previous snapshot's tuple is held, so that no address of it can be
reused by a new object while it is compared against.
"""

from __future__ import annotations

from functools import partial
from itertools import compress, islice
from operator import is_not, lt, not_
from typing import Callable, Optional

from memtrace.model.snapshot import StackStats


class SeenStacks:
    def __init__(self, stacks: tuple[StackStats, ...], canonical: bool,
                 moving: list[tuple[int, StackStats]], places: Optional[dict[int, int]] = None) -> None:
        """canonical: their order is the model's own sort (strictly
        increasing keys); moving: (entity id, stack) of those whose
        live_delta_bytes is not 0; places: id(stack) -> index, if known."""
        self.stacks = stacks
        self._places = places
        self.canonical = canonical
        self.moving = moving

    @property
    def places(self) -> dict[int, int]:
        if self._places is None:
            self._places = dict(zip(map(id, self.stacks), range(len(self.stacks))))
        return self._places

    def since(self, stacks: tuple[StackStats, ...], sort_key: Callable[[StackStats], tuple]):
        """(the stacks that are new objects, the previous snapshot's that
        went, id -> index of this snapshot's or None, the object each new
        one replaced or None: not known), when this snapshot's
        order is the model's sort; None otherwise, or when an object comes
        twice: then the recorder takes every stack. The collector's own
        tuple (memtrace.model.snapshot.StackChanges) says it all."""
        if getattr(stacks, "since", None) is self.stacks:
            return stacks.fresh, stacks.gone, None, stacks.replaced
        places = dict(zip(map(id, stacks), range(len(stacks))))
        if len(places) != len(stacks) or not self.canonical:
            return None
        before = self.places
        fresh = list(compress(range(len(stacks)), map(not_, map(before.__contains__, places))))
        # In order: the stacks kept keep their order among themselves (the
        # previous one was sorted), and each new one sits between its
        # neighbours.
        kept = list(filter(partial(is_not, None), map(before.get, places)))
        if not all(map(lt, kept, islice(kept, 1, None))):
            return None
        last = len(stacks) - 1
        for i in fresh:
            key = sort_key(stacks[i])
            if (i > 0 and not sort_key(stacks[i - 1]) < key) or (i < last and not key < sort_key(stacks[i + 1])):
                return None
        gone = [self.stacks[before[a]] for a in before.keys() - places.keys()]
        return [stacks[i] for i in fresh], gone, places, None
