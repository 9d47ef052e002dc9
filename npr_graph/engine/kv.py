"""Paged KV-cache bookkeeping: a page pool and lanes that share pages.

The model runner owns, per layer, K/V tensors of shape ``[num_pages, page_size, ...]``; this
module only decides which *slots* (``page * page_size + offset``) hold which tokens.

* :class:`PagePool` hands out pages 1..num_pages-1 with reference counts.  Page 0 is a scratch
  page: never handed out, padding tokens read/write there.
* A :class:`LaneKV` is one decoding lane's view of the cache: an ordered list of
  :class:`Segment` slot ranges, ancestors' tokens first, its own writable tail last.
* ``lane.fork(k)`` makes k children sharing every page (no copy); a partly filled tail page is
  shared too and copied on write: a child appending to a tail page that another lane still
  lists gets a fresh page and a :class:`PageCopy` is queued on the pool; the last holder writes
  in place, so k children cost at most k-1 copies.
* :func:`join` builds the join lane from a fork's branches: the shared prefix once, then each
  branch's own tokens in branch order, with no copy; it appends to a fresh page.

Reference-count rule: a live lane holds exactly one reference to each *distinct* page it lists,
however many of its segments sit on that page (a join view may list one page twice: a branch's
copied tail page holds both prefix slots and the branch's own slots).

The runner drains ``pool.drain_copies()`` once per step and applies the copies in list order
*before* writing the step's new K/V (a copy's source page may have been freed and handed out
again in the same step).  Fork and join only between steps, after the forward that filled the
slots returned by ``append_slots``.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

SCRATCH_PAGE = 0


class PoolExhausted(Exception):
    """Not enough free pages; the scheduler makes the request wait or preempts another."""

    def __init__(self, needed: int, free: int, usable: int) -> None:
        super().__init__(
            f"KV page pool exhausted: need {needed} page(s), {free} free of {usable} usable"
        )
        self.needed = needed
        self.free = free


@dataclass(frozen=True, slots=True)
class Segment:
    """Slots ``[start, end)`` of ``page``, in view order."""

    page: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class PageCopy(NamedTuple):
    """Copy slots ``[0, num_slots)`` of page ``src`` into page ``dst`` (every layer, K and V)."""

    src: int
    dst: int
    num_slots: int


class PagePool:
    """Reference-counted pages; bookkeeping only."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2 or page_size < 1:
            raise ValueError(
                f"need num_pages >= 2 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcount = [0] * num_pages
        self._free: deque[int] = deque(range(1, num_pages))
        self._peak = 0
        self.pending_copies: list[PageCopy] = []
        self._fork_ids = itertools.count(1)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def pages_for(self, tokens: int) -> int:
        """Pages ``tokens`` slots fill."""
        return -(-tokens // self.page_size)

    @property
    def peak_used(self) -> int:
        """The most pages in use at once since the pool was built or :meth:`reset_peak`."""
        return self._peak

    def reset_peak(self) -> None:
        """Start the peak again from the pages in use now (each ``generate`` reports its own)."""
        self._peak = self.num_used

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhausted(1, 0, self.num_usable)
        page = self._free.popleft()
        self.refcount[page] = 1
        self._peak = max(self._peak, self.num_used)
        return page

    def incref(self, page: int) -> None:
        if page == SCRATCH_PAGE or self.refcount[page] <= 0:
            raise RuntimeError(f"incref of page {page} which is not allocated")
        self.refcount[page] += 1

    def decref(self, page: int) -> None:
        if page == SCRATCH_PAGE or self.refcount[page] <= 0:
            raise RuntimeError(f"decref of page {page} which is not allocated (double free?)")
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            self._free.append(page)

    def drain_copies(self) -> list[PageCopy]:
        """The copies queued since the last drain, in the order they must be applied."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check(self, live_lanes: Iterable[LaneKV]) -> None:
        """Assert every invariant, given *all* lanes that hold references."""
        ps, n = self.page_size, self.num_pages
        lanes = list(live_lanes)
        assert len({id(lane) for lane in lanes}) == len(lanes), "a lane is listed twice"
        holders = [0] * n
        open_tails: dict[int, list[Segment]] = {}
        for i, lane in enumerate(lanes):
            assert lane.pool is self, f"lane {i} belongs to another pool"
            assert lane.alive, f"lane {i} was released or consumed but is listed as live"
            total, seen, slots = 0, set(), set()
            for seg in lane._segments:
                assert 0 < seg.page < n, f"lane {i}: segment {seg} on invalid/scratch page"
                assert 0 <= seg.start <= seg.end <= ps, f"lane {i}: bad bounds {seg}"
                total += seg.size
                for s in range(seg.page * ps + seg.start, seg.page * ps + seg.end):
                    assert s not in slots, f"lane {i}: slot {s} listed twice"
                    slots.add(s)
                seen.add(seg.page)
            assert total == lane.num_tokens, f"lane {i}: segments hold {total} != {lane.num_tokens}"
            assert 0 <= lane.num_inherited <= lane.num_tokens, f"lane {i}: bad fork point"
            for page in seen:
                holders[page] += 1
            if lane._tail_open:
                assert lane._segments, f"lane {i}: open tail without segments"
                tail = lane._segments[-1]
                open_tails.setdefault(tail.page, []).append(tail)
        assert self.refcount[SCRATCH_PAGE] == 0, "scratch page 0 has references"
        free = list(self._free)
        free_set = set(free)
        assert len(free_set) == len(free), "a page is on the free list twice"
        assert SCRATCH_PAGE not in free_set, "scratch page 0 is on the free list"
        for page in range(1, n):
            rc = self.refcount[page]
            if page in free_set:
                assert rc == 0, f"page {page} is free but has refcount {rc}"
                assert holders[page] == 0, f"page {page} is free but listed by a live lane"
            else:
                assert rc > 0, f"page {page} is neither free nor referenced (lost)"
            assert rc == holders[page], (
                f"page {page}: refcount {rc} != {holders[page]} live lane(s) listing it"
            )
        # Copy-on-write: a shared page may be some lanes' open tail only while nobody has written
        # past the shared end, i.e. all open tails on it agree and every other listing ends there.
        for page, tails in open_tails.items():
            if self.refcount[page] > 1:
                assert all(t == tails[0] for t in tails), (
                    f"page {page}: shared open tails diverged {tails} (in-place write while shared)"
                )
                for lane in lanes:
                    for seg in lane._segments:
                        assert seg.page != page or seg.end <= tails[0].end, (
                            f"page {page}: {seg} extends past shared open tail {tails[0]}"
                        )


class LaneKV:
    """One lane's view of the cache.

    ``num_inherited`` leading tokens are the prefix shared with the siblings of the innermost
    fork this lane descends from (0 for a root lane); :meth:`own_segments` are the rest.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._segments: list[Segment] = []
        self.num_tokens = 0
        self._tail_open = False  # may the last segment be extended (after CoW if shared)?
        self._forks: tuple[tuple[int, int], ...] = ()  # (fork id, prefix length), outermost first
        self.alive = True
        self.forked_as: int | None = None  # set when consumed by fork(): that fork's id
        # The view's flat slots, kept in step with appends so a decode step does not rebuild
        # long views segment by segment; ``_num_cached`` leading entries are valid.
        # (numpy: appending one slot costs ~1 us there, ~30 us as a torch tensor op)
        self._slot_cache = np.zeros(0, dtype=np.int64)
        self._num_cached = 0

    def __repr__(self) -> str:
        state = "live" if self.alive else "dead"
        return f"LaneKV({state}, tokens={self.num_tokens}, inherited={self.num_inherited}, segs={self._segments})"

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    @property
    def num_inherited(self) -> int:
        return self._forks[-1][1] if self._forks else 0

    @property
    def fork_depth(self) -> int:
        return len(self._forks)

    def pages(self) -> list[int]:
        """Distinct pages listed, in view order (one reference held per page)."""
        return list(dict.fromkeys(s.page for s in self._segments))

    def own_segments(self) -> list[Segment]:
        """Segments holding tokens ``[num_inherited, num_tokens)``: this lane's own tokens."""
        return _slice(self._segments, self.num_inherited, self.num_tokens)

    def flat_slots(self) -> list[int]:
        ps = self.pool.page_size
        return [
            s for g in self._segments for s in range(g.page * ps + g.start, g.page * ps + g.end)
        ]

    def slot_array(self) -> np.ndarray:
        """The view's flat slots as int64 ``[num_tokens]`` (a view of a cache: do not modify;
        later appends leave it as it is)."""
        if self._num_cached != self.num_tokens:
            ps = self.pool.page_size
            filled = [seg for seg in self._segments if seg.size]
            bases, sizes = [s.page * ps + s.start for s in filled], [s.size for s in filled]
            cache = np.zeros(2 * self.num_tokens, dtype=np.int64)
            cache[: self.num_tokens] = _concat_ranges(bases, sizes).numpy()
            self._slot_cache, self._num_cached = cache, self.num_tokens
        return self._slot_cache[: self.num_tokens]

    def _cache_append(self, first: int, slots: list[int]) -> None:
        """Record ``slots`` for view positions from ``first`` (if the cache reaches there)."""
        if self._num_cached != first:
            return
        end = first + len(slots)
        if end > len(self._slot_cache):
            grown = np.zeros(max(2 * end, 64), dtype=np.int64)
            grown[:first] = self._slot_cache[:first]
            self._slot_cache = grown
        self._slot_cache[first:end] = slots
        self._num_cached = end

    def _live(self) -> None:
        if not self.alive:
            raise RuntimeError("lane was released or consumed by fork/join")

    def pages_needed(self, n: int) -> int:
        """Fresh pages ``append_slots(n)`` would allocate (including a copy-on-write page)."""
        if n <= 0:
            return 0
        ps, room, cow = self.pool.page_size, 0, 0
        if self._tail_open and self._segments[-1].end < ps:
            tail = self._segments[-1]
            room = ps - tail.end
            cow = int(self.pool.refcount[tail.page] > 1)
        return cow + -(-max(0, n - room) // ps)

    def shared_tail(self) -> int | None:
        """The page of a partly filled tail that other views hold too (an append copies it)."""
        if self._tail_open and self._segments[-1].end < self.pool.page_size:
            page = self._segments[-1].page
            return page if self.pool.refcount[page] > 1 else None
        return None

    def append_slots(self, n: int) -> list[int]:
        """Reserve slots for ``n`` new tokens; all-or-nothing (raises PoolExhausted untouched)."""
        self._live()
        if n == 1 and self._tail_open:  # the usual decode step: one more slot in an own tail
            tail = self._segments[-1]
            if tail.end < self.pool.page_size and self.pool.refcount[tail.page] == 1:
                slot = tail.page * self.pool.page_size + tail.end
                self._segments[-1] = Segment(tail.page, tail.start, tail.end + 1)
                self.num_tokens += 1
                self._cache_append(self.num_tokens - 1, [slot])
                return [slot]
        need = self.pages_needed(n)
        if need > self.pool.num_free:
            raise PoolExhausted(need, self.pool.num_free, self.pool.num_usable)
        pool, ps, out = self.pool, self.pool.page_size, []
        first = self.num_tokens
        while n > 0:
            if not self._tail_open or self._segments[-1].end == ps:
                self._segments.append(Segment(pool.allocate(), 0, 0))
                self._tail_open = True
            tail = self._segments[-1]
            if pool.refcount[tail.page] > 1:  # shared partial tail: copy on write
                dst = pool.allocate()
                pool.pending_copies.append(PageCopy(tail.page, dst, tail.end))
                pool.decref(tail.page)
                tail = Segment(dst, tail.start, tail.end)
                self._num_cached = 0  # the copied tokens moved: rebuild the cache on demand
            take = min(n, ps - tail.end)
            base = tail.page * ps
            out.extend(range(base + tail.end, base + tail.end + take))
            self._segments[-1] = Segment(tail.page, tail.start, tail.end + take)
            self.num_tokens += take
            n -= take
        self._cache_append(first, out)
        return out

    def drop_last(self) -> None:
        """Take back the slot of the last :meth:`append_slots` (a token fed before it was known,
        which turned out to be one the engine does not keep). Its page is released when nothing
        else in the view lists it."""
        self._live()
        if self.num_tokens <= self.num_inherited:
            raise RuntimeError("drop_last: the lane has no own token to drop")
        tail = self._segments[-1]
        if tail.size > 1:
            self._segments[-1] = Segment(tail.page, tail.start, tail.end - 1)
        else:  # the slot opened a fresh page (an append never leaves a shared tail page behind)
            self._segments.pop()
            if all(seg.page != tail.page for seg in self._segments):
                self.pool.decref(tail.page)
            self._tail_open = False
        self.num_tokens -= 1
        self._num_cached = min(self._num_cached, self.num_tokens)

    def fork(self, k: int) -> list[LaneKV]:
        """k children sharing every page; this lane is consumed (its references go to child 0)."""
        self._live()
        if k < 1:
            raise ValueError(f"fork needs k >= 1, got {k}")
        for page in self.pages():
            for _ in range(k - 1):
                self.pool.incref(page)
        fork_id = next(self.pool._fork_ids)
        forks = (*self._forks, (fork_id, self.num_tokens))
        children = [
            _make(self.pool, list(self._segments), self.num_tokens, self._tail_open, forks)
            for _ in range(k)
        ]
        if self._num_cached == self.num_tokens:
            for child in children:
                child._slot_cache = self._slot_cache.copy()
                child._num_cached = self._num_cached
        self._consume()
        self.forked_as = fork_id
        return children

    def release(self) -> None:
        """Drop every reference (finished or preempted)."""
        self._live()
        for page in self.pages():
            self.pool.decref(page)
        self._consume()

    def _consume(self) -> None:
        self._segments, self.num_tokens, self._tail_open, self.alive = [], 0, False, False
        self._slot_cache, self._num_cached = np.zeros(0, dtype=np.int64), 0


def _make(
    pool: PagePool,
    segments: list[Segment],
    num_tokens: int,
    tail_open: bool,
    forks: tuple[tuple[int, int], ...],
) -> LaneKV:
    lane = LaneKV(pool)
    lane._segments, lane.num_tokens, lane._tail_open, lane._forks = (
        segments,
        num_tokens,
        tail_open,
        forks,
    )
    return lane


def _slice(segments: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """The (sub)segments holding view positions ``[lo, hi)``."""
    out, pos = [], 0
    for seg in segments:
        a, b = max(lo, pos), min(hi, pos + seg.size)
        if a < b:
            out.append(Segment(seg.page, seg.start + a - pos, seg.start + b - pos))
        pos += seg.size
        if pos >= hi:
            break
    return out


def _merge(segments: Iterable[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1].page == seg.page and out[-1].end == seg.start:
            out[-1] = Segment(seg.page, out[-1].start, seg.end)
        elif seg.size:
            out.append(seg)
    return out


def join(branches: Sequence[LaneKV], prefix: LaneKV | None = None) -> LaneKV:
    """The join lane: shared prefix once + each branch's own tokens, in branch order.

    ``branches`` must be live siblings of one fork (any non-empty subset, e.g. after pruning);
    ``prefix``, if given, is the lane that fork consumed (checked, not read).  The branches are
    consumed; the join lane holds one reference per distinct page it lists, appends to a fresh
    page, and inherits the forked lane's fork point, so nested forks join level by level.
    """
    if not branches:
        raise ValueError("join needs at least one branch")
    for b in branches:
        b._live()
    first = branches[0]
    pool, forks = first.pool, first._forks
    if len({id(b) for b in branches}) != len(branches):
        raise ValueError("a branch is listed twice")
    if not forks or any(b.pool is not pool or b._forks != forks for b in branches):
        raise ValueError("join branches must be siblings of one fork")
    if prefix is not None and (prefix.alive or prefix.forked_as != forks[-1][0]):
        raise ValueError("prefix is not the lane whose fork produced these branches")
    t = forks[-1][1]
    segs = _slice(first._segments, 0, t)
    for b in branches:
        segs += _slice(b._segments, t, b.num_tokens)
    segs = _merge(segs)
    lane = _make(pool, segs, sum(s.size for s in segs), False, forks[:-1])
    for page in lane.pages():
        pool.incref(page)
    for b in branches:
        b.release()
    return lane


class SlotTable(NamedTuple):
    """Per-step gather indices: ``slots[b, j]`` is lane b's j-th view token (pad: slot 0)."""

    slots: torch.Tensor  # int64 [B, L]
    mask: torch.Tensor  # bool [B, L]
    lengths: torch.Tensor  # int64 [B]


def _concat_ranges(bases: list[int], sizes: list[int]) -> torch.Tensor:
    """``range(bases[i], bases[i] + sizes[i])`` concatenated, int64."""
    total = sum(sizes)
    out = torch.zeros(total, dtype=torch.long)
    if total:
        # One cumsum: step 1 inside a range, a jump at each start.
        base_t, size_t = torch.tensor(bases), torch.tensor(sizes)
        delta = torch.ones(total, dtype=torch.long)
        first = torch.cumsum(size_t, 0) - size_t
        delta[first] = base_t - torch.cat([base_t.new_zeros(1), base_t[:-1] + size_t[:-1] - 1])
        out[:total] = torch.cumsum(delta, 0)
    return out


class SlotViews:
    """The KV views of one step's rows: ``rows[b]`` holds row b's flat slots in view order
    (int64 numpy, shared with the lanes' caches: read only). Each consumer builds the form it
    needs once, on first use: the torch path a padded table (:attr:`table`), kernels' page
    tables the concatenated lists (:attr:`indptr`, :attr:`indices`), which cost a fraction of
    padding to the longest view and cutting the rows out again."""

    def __init__(self, rows: list[np.ndarray]) -> None:
        self.rows = rows
        self.lengths = [len(row) for row in rows]
        self._table: SlotTable | None = None
        self._lists: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, lanes: Sequence[LaneKV]) -> SlotViews:
        rows = []
        for lane in lanes:
            lane._live()
            rows.append(lane.slot_array())
        return cls(rows)

    def prefixes(self, rows: Sequence[int], lengths: Sequence[int]) -> SlotViews:
        """Views of the first ``lengths[j]`` slots of row ``rows[j]``."""
        return SlotViews([self.rows[r][:n] for r, n in zip(rows, lengths, strict=True)])

    @property
    def table(self) -> SlotTable:
        """Padded to the longest view (pad: slot 0), with its mask."""
        if self._table is None:
            lens = torch.tensor(self.lengths, dtype=torch.long)
            mask = torch.arange(max(self.lengths, default=0)) < lens[:, None]
            if self.rows:
                rows = [torch.from_numpy(row) for row in self.rows]
                slots = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            else:
                slots = torch.zeros(mask.shape, dtype=torch.long)
            self._table = SlotTable(slots, mask, lens)
        return self._table

    @property
    def indptr(self) -> torch.Tensor:
        """int32 ``[B + 1]``: row b's slots are ``indices[indptr[b] : indptr[b + 1]]``."""
        return self._concatenated()[0]

    @property
    def indices(self) -> torch.Tensor:
        """int32 ``[sum of lengths]``: every row's slots, row after row."""
        return self._concatenated()[1]

    def _concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._lists is None:
            indptr = np.zeros(len(self.rows) + 1, dtype=np.int32)
            indptr[1:] = np.cumsum(self.lengths)
            indices = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)
            self._lists = torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int32))
        return self._lists


def slot_table(lanes: Sequence[LaneKV]) -> SlotTable:
    """Flat slot indices of each lane's view, in view order, padded to the longest view."""
    return SlotViews.of(lanes).table


def pages_needed(appends: list[tuple[LaneKV, int]]) -> int:
    """Fresh pages a step's ``append_slots`` calls take together. Views sharing a partly filled
    tail page each copy it, but for the last: when every holder appends, the last finds the
    page its own and writes in place (:meth:`LaneKV.pages_needed` counts each view alone)."""
    need, appending = 0, Counter()
    for kv, n in appends:
        need += kv.pages_needed(n)
        if n > 0 and (page := kv.shared_tail()) is not None:
            appending[page] += 1
    if appends:
        refcount = appends[0][0].pool.refcount
        need -= sum(1 for page, holders in appending.items() if holders >= refcount[page])
    return need
