"""Paged KV bookkeeping: unit tests plus a shadow-model property test over random DAGs."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from npr_graph.engine.kv import (
    LaneKV,
    PageCopy,
    PagePool,
    PoolExhausted,
    Segment,
    SlotViews,
    join,
    pages_needed,
    slot_table,
)


class Shadow:
    """Simulated runner: a flat slot array of token ids plus each lane's logical tokens."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.mem = [-1] * (pool.num_pages * pool.page_size)
        self.tokens: dict[int, list[int]] = {}  # id(lane) -> logical view
        self.writes: list[tuple[LaneKV, list[int], list[int]]] = []
        self.ids = itertools.count()
        self.copies: list[PageCopy] = []

    def new(self, lane: LaneKV, tokens: list[int] | None = None) -> LaneKV:
        self.tokens[id(lane)] = list(tokens or [])
        return lane

    def append(self, lane: LaneKV, n: int) -> None:
        slots = lane.append_slots(n)
        toks = [next(self.ids) for _ in range(n)]
        self.tokens[id(lane)] += toks
        self.writes.append((lane, slots, toks))

    def step(self) -> None:
        """Runner order: queued copies first (in order), then this step's K/V writes."""
        ps = self.pool.page_size
        for c in self.pool.drain_copies():
            assert 0 < c.num_slots < ps and c.src != c.dst
            self.mem[c.dst * ps : c.dst * ps + c.num_slots] = self.mem[
                c.src * ps : c.src * ps + c.num_slots
            ]
            self.copies.append(c)
        for lane, slots, toks in self.writes:
            if lane.alive:
                for s, t in zip(slots, toks, strict=True):
                    assert s >= ps, "wrote into the scratch page"
                    self.mem[s] = t
        self.writes = []

    def verify(self, lanes: list[LaneKV]) -> None:
        table = slot_table(lanes)
        assert table.slots.shape == table.mask.shape
        for i, lane in enumerate(lanes):
            n = lane.num_tokens
            assert int(table.lengths[i]) == n
            assert table.mask[i, :n].all() and not table.mask[i, n:].any()
            assert (table.slots[i, n:] == 0).all()
            got = [self.mem[s] for s in table.slots[i, :n].tolist()]
            assert got == self.tokens[id(lane)], f"lane {i}: {lane}"
            assert table.slots[i, :n].tolist() == lane.flat_slots()
        views = SlotViews.of(lanes)  # what the kernels' page tables are built from
        for i, lane in enumerate(lanes):
            lo, hi = views.indptr[i : i + 2].tolist()
            assert views.indices[lo:hi].tolist() == lane.flat_slots()


def _prompt(pool: PagePool, sh: Shadow, n: int) -> LaneKV:
    lane = sh.new(LaneKV(pool))
    sh.append(lane, n)
    sh.step()
    return lane


def _fork(sh: Shadow, lane: LaneKV, k: int) -> list[LaneKV]:
    toks = sh.tokens[id(lane)]
    return [sh.new(c, toks) for c in lane.fork(k)]


def _join(sh: Shadow, branches: list[LaneKV], prefix_len: int, prefix=None) -> LaneKV:
    toks = sh.tokens[id(branches[0])][:prefix_len]
    for b in branches:
        toks += sh.tokens[id(b)][prefix_len:]
    return sh.new(join(branches, prefix), toks)


# ----------------------------------------------------------------------------- unit tests


def test_pool_page0_reserved_allocate_and_exhaustion():
    pool = PagePool(4, 2)
    pages = [pool.allocate() for _ in range(3)]
    assert sorted(pages) == [1, 2, 3] and pool.num_free == 0 and pool.num_used == 3
    with pytest.raises(PoolExhausted, match="exhausted"):
        pool.allocate()
    for p in pages:
        pool.decref(p)
    assert pool.num_free == 3 and pool.num_used == 0 and pool.peak_used == 3
    pool.check([])


def test_double_free_and_bad_refs_raise():
    pool = PagePool(3, 4)
    p = pool.allocate()
    pool.incref(p)
    pool.decref(p)
    pool.decref(p)
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref(p)
    with pytest.raises(RuntimeError):
        pool.incref(p)
    with pytest.raises(RuntimeError):
        pool.decref(0)
    lane = LaneKV(pool)
    lane.append_slots(3)
    lane.release()
    with pytest.raises(RuntimeError):
        lane.release()
    pool.check([])
    assert pool.num_free == 2


def test_append_slots_fill_pages_in_order():
    pool = PagePool(8, 4)
    lane = LaneKV(pool)
    slots = lane.append_slots(6)
    p, q = lane.pages()
    assert slots == [p * 4 + i for i in range(4)] + [q * 4, q * 4 + 1]
    assert lane.segments == (Segment(p, 0, 4), Segment(q, 0, 2))
    assert lane.append_slots(1) == [q * 4 + 2]
    assert lane.append_slots(0) == []
    assert pool.drain_copies() == []
    pool.check([lane])


def test_fork_shares_without_copy():
    pool = PagePool(16, 4)
    sh = Shadow(pool)
    root = _prompt(pool, sh, 10)
    used = pool.num_used
    kids = _fork(sh, root, 3)
    assert not root.alive and root.forked_as is not None
    assert pool.num_used == used and pool.pending_copies == []
    for page in kids[0].pages():
        assert pool.refcount[page] == 3
    assert all(k.segments == kids[0].segments and k.num_inherited == 10 for k in kids)
    assert all(k.own_segments() == [] for k in kids)
    pool.check(kids)
    sh.verify(kids)
    with pytest.raises(RuntimeError):
        root.append_slots(1)


def test_cow_only_on_partial_tail_and_last_writer_takes_page():
    # full pages: no copy at all
    pool = PagePool(16, 4)
    sh = Shadow(pool)
    kids = _fork(sh, _prompt(pool, sh, 8), 3)
    for k in kids:
        sh.append(k, 1)
    sh.step()
    assert sh.copies == []
    pool.check(kids)
    sh.verify(kids)
    # partial tail page shared by 3: first two writers copy, the last one writes in place
    pool = PagePool(16, 4)
    sh = Shadow(pool)
    root = _prompt(pool, sh, 6)
    tail = root.segments[-1].page
    kids = _fork(sh, root, 3)
    for k in kids:
        sh.append(k, 1)
        pool.check(kids)
    sh.step()
    assert [(c.src, c.num_slots) for c in sh.copies] == [(tail, 2), (tail, 2)]
    assert kids[2].segments[-1] == Segment(tail, 0, 3)
    assert pool.refcount[tail] == 1
    pool.check(kids)
    sh.verify(kids)


@pytest.mark.parametrize(
    "appends",
    [(1, 1, 1), (1, 5, 0), (3, 3, 3), (0, 0, 9), (1, 0, 0), (5, 9, 2)],
    ids=["all-one", "one-idle", "fill-tails", "one-long", "alone", "past-the-tail"],
)
def test_pages_needed_counts_a_step_as_its_appends_take_pages(appends):
    """Siblings sharing a partly filled tail page each copy it but the last, when every holder
    appends: a step's need counted per lane took one copy too many, so a lone request was cut
    for want of pages it had (helper's audit)."""
    pool = PagePool(32, 4)
    sh = Shadow(pool)
    root = _prompt(pool, sh, 6)
    kids = _fork(sh, root, 3)
    step = list(zip(kids, appends, strict=True))
    need = pages_needed(step)
    assert need <= sum(kv.pages_needed(n) for kv, n in step)
    free = pool.num_free
    for kv, n in step:
        if n:
            sh.append(kv, n)
    assert free - pool.num_free == need
    sh.step()
    pool.check(kids)
    sh.verify(kids)


def test_join_sees_prefix_once_and_all_branches():
    pool = PagePool(32, 4)
    sh = Shadow(pool)
    root = _prompt(pool, sh, 6)
    kids = _fork(sh, root, 3)
    for k, n in zip(kids, (1, 5, 0), strict=True):
        if n:
            sh.append(k, n)
    sh.step()
    used = pool.num_used
    j = _join(sh, kids, 6, prefix=root)
    # no copy; the tail page only kids[2] still held (unwritten, so unused by the view) is freed
    assert pool.num_used == used - 1 and pool.pending_copies == []
    assert j.num_tokens == 6 + 1 + 5 and j.num_inherited == 0 and j.fork_depth == 0
    assert all(not k.alive for k in kids)
    pool.check([j])
    sh.verify([j])
    before = set(j.pages())
    sh.append(j, 1)
    sh.step()
    assert j.segments[-1].start == 0 and j.segments[-1].page not in before
    pool.check([j])
    sh.verify([j])
    j.release()
    assert pool.num_used == 0
    pool.check([])


def test_join_rejects_non_siblings_and_wrong_prefix():
    pool = PagePool(32, 4)
    sh = Shadow(pool)
    a = _fork(sh, _prompt(pool, sh, 3), 2)
    other = _prompt(pool, sh, 3)
    b = _fork(sh, _prompt(pool, sh, 3), 2)
    with pytest.raises(ValueError):
        join([a[0], b[0]])
    with pytest.raises(ValueError):
        join([a[0]], prefix=other)
    with pytest.raises(ValueError):
        join([other])
    with pytest.raises(ValueError):
        join([a[0], a[0]])
    pool.check([*a, *b, other])


def test_nested_fork_join():
    pool = PagePool(64, 4)
    sh = Shadow(pool)
    root = _prompt(pool, sh, 5)
    a, b = _fork(sh, root, 2)
    sh.append(a, 3)
    sh.append(b, 2)
    sh.step()
    b1, b2 = _fork(sh, b, 2)
    assert b1.num_inherited == 7 and b1.fork_depth == 2
    sh.append(b1, 4)
    sh.append(b2, 1)
    sh.step()
    jb = _join(sh, [b1, b2], 7, prefix=b)
    assert jb.num_inherited == 5 and jb.fork_depth == 1
    sh.append(jb, 2)
    sh.step()
    pool.check([a, jb])
    sh.verify([a, jb])
    j = _join(sh, [a, jb], 5, prefix=root)
    assert j.num_tokens == 5 + 3 + 2 + 4 + 1 + 2
    pool.check([j])
    sh.verify([j])
    j.release()
    pool.check([])
    assert pool.num_used == 0


def test_page_size_one():
    pool = PagePool(64, 1)
    sh = Shadow(pool)
    kids = _fork(sh, _prompt(pool, sh, 4), 3)
    for i, k in enumerate(kids):
        sh.append(k, i + 1)
    sh.step()
    assert sh.copies == []
    pool.check(kids)
    sh.verify(kids)
    j = _join(sh, kids, 4)
    assert j.num_tokens == 4 + 1 + 2 + 3
    sh.append(j, 2)
    sh.step()
    pool.check([j])
    sh.verify([j])
    j.release()
    assert pool.num_used == 0


def test_exhaustion_leaves_pool_consistent():
    pool = PagePool(5, 4)  # 4 usable pages
    sh = Shadow(pool)
    root = _prompt(pool, sh, 6)  # 2 pages
    a, b = _fork(sh, root, 2)
    assert a.pages_needed(7) == 3  # CoW copy of the shared tail (2 free slots) + 2 pages for 5
    segs, free = a.segments, pool.num_free
    with pytest.raises(PoolExhausted) as err:
        a.append_slots(7)
    assert err.value.needed == 3 and err.value.free == 2
    assert a.segments == segs and a.num_tokens == 6 and pool.num_free == free
    assert pool.pending_copies == []
    pool.check([a, b])
    sh.append(a, 6)  # exactly fits
    sh.step()
    assert pool.num_free == 0
    assert b.pages_needed(2) == 0  # b is now the tail's only holder: writes in place
    with pytest.raises(PoolExhausted):
        b.append_slots(3)
    pool.check([a, b])
    sh.verify([a, b])
    a.release()
    b.release()
    pool.check([])
    assert pool.num_free == 4 and pool.peak_used == 4


def test_slot_table_padding_and_order():
    pool = PagePool(16, 2)
    x, y = LaneKV(pool), LaneKV(pool)
    sx = x.append_slots(3)
    sy = y.append_slots(1)
    t = slot_table([x, y])
    assert t.slots.dtype == torch.long and t.mask.dtype == torch.bool
    assert t.slots.tolist() == [sx, sy + [0, 0]]
    assert t.mask.tolist() == [[True] * 3, [True, False, False]]
    assert t.lengths.tolist() == [3, 1]
    empty = slot_table([])
    assert empty.slots.shape == (0, 0)


def test_slot_views_lists_and_prefixes():
    pool = PagePool(16, 2)
    x, y = LaneKV(pool), LaneKV(pool)
    sx, sy = x.append_slots(3), y.append_slots(2)
    views = SlotViews.of([x, y])
    assert views.lengths == [3, 2]
    assert views.indptr.tolist() == [0, 3, 5] and views.indptr.dtype == torch.int32
    assert views.indices.tolist() == sx + sy and views.indices.dtype == torch.int32
    assert views.table.slots.tolist() == [sx, sy + [0]]
    x.append_slots(2)  # a later append leaves this step's views as they were
    assert SlotViews.of([x, y]).indices.tolist() != views.indices.tolist()
    assert views.rows[0].tolist() == sx
    rows = views.prefixes([0, 0, 1], [1, 3, 2])
    assert rows.indices.tolist() == sx[:1] + sx + sy and rows.lengths == [1, 3, 2]
    assert SlotViews.of([]).indptr.tolist() == [0] and SlotViews.of([]).indices.numel() == 0


def test_check_detects_violations():
    pool = PagePool(8, 4)
    lane = LaneKV(pool)
    lane.append_slots(5)
    with pytest.raises(AssertionError, match="refcount"):
        pool.check([])  # lane omitted: its pages look leaked
    p = lane.pages()[0]
    pool.refcount[p] += 1
    with pytest.raises(AssertionError, match=f"page {p}: refcount"):
        pool.check([lane])
    pool.refcount[p] -= 1
    a, b = lane.fork(2)
    a._segments[-1] = Segment(a._segments[-1].page, 0, 2)  # simulate an in-place write while shared
    a.num_tokens += 1
    with pytest.raises(AssertionError, match="diverged"):
        pool.check([a, b])


# ------------------------------------------------------------------- property test


class Node:
    """A position in a request's DAG: a live leaf lane, or a fork awaiting its join."""

    def __init__(self, lane: LaneKV | None, parent: Node | None) -> None:
        self.lane = lane
        self.parent = parent
        self.children: list[Node] = []
        self.forked: LaneKV | None = None  # the lane the fork consumed
        self.prefix_len = 0


def _leaves(node: Node):
    if node.lane is not None:
        yield node
    for c in node.children:
        yield from _leaves(c)


def _forks(node: Node):
    if node.lane is None:
        yield node
    for c in node.children:
        yield from _forks(c)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_random_dags_shadow_model(data):
    page_size = data.draw(st.sampled_from([4, 2, 3, 8, 1]), label="page_size")
    num_pages = data.draw(st.integers(4, 24), label="num_pages")
    pool = PagePool(num_pages, page_size)
    sh = Shadow(pool)
    roots: list[Node] = []

    def live() -> list[Node]:
        return [leaf for r in roots for leaf in _leaves(r)]

    def remove(node: Node) -> None:
        while True:
            parent = node.parent
            if parent is None:
                roots.remove(node)
                return
            parent.children.remove(node)
            if parent.children:
                return
            node = parent  # a fork with no branches left disappears too

    def check() -> None:
        lanes = [n.lane for n in live()]
        pool.check(lanes)
        sh.verify(lanes)

    for _ in range(data.draw(st.integers(5, 50), label="ops")):
        leaves = live()
        op = data.draw(
            st.sampled_from(
                ["request", "step", "batch", "drop", "fork", "join", "release", "preempt"]
            )
            if leaves
            else st.just("request"),
            label="op",
        )
        if op == "request":
            lane = sh.new(LaneKV(pool))
            try:
                sh.append(lane, data.draw(st.integers(0, 3 * page_size + 2), label="prompt"))
            except PoolExhausted:
                assert lane.num_tokens == 0 and pool.pending_copies == []
                continue
            sh.step()
            node = Node(lane, None)
            roots.append(node)
            group = data.draw(st.integers(1, 4), label="group")
            if group > 1:  # RL group: n samples share the prompt's KV
                node.forked, node.prefix_len, node.lane = lane, lane.num_tokens, None
                node.children = [Node(c, node) for c in _fork(sh, lane, group)]
        elif op == "step":  # a batch of appends (and releases) in one runner step
            for _ in range(data.draw(st.integers(1, 4), label="batch")):
                leaves = live()
                if not leaves:
                    break
                leaf = data.draw(st.sampled_from(leaves), label="lane")
                if data.draw(st.integers(0, 3), label="append or release") > 0:
                    n = data.draw(st.integers(1, 2 * page_size + 1), label="n")
                    lane, tokens, free = leaf.lane, leaf.lane.num_tokens, pool.num_free
                    copies = len(pool.pending_copies)
                    try:
                        sh.append(lane, n)
                    except PoolExhausted as e:
                        event("append exhausted the pool")
                        assert e.needed == lane.pages_needed(n) > free
                        assert lane.num_tokens == tokens and pool.num_free == free
                        assert len(pool.pending_copies) == copies
                else:
                    leaf.lane.release()
                    remove(leaf)
            sh.step()
        elif op == "batch":  # a runner step's appends, their pages counted together first
            leaves = live()
            chosen = data.draw(st.lists(st.sampled_from(leaves), unique=True), label="lanes")
            step = [(leaf.lane, data.draw(st.integers(0, page_size + 1))) for leaf in chosen]
            need, free = pages_needed(step), pool.num_free
            if need > free:
                event("batch does not fit")
                continue
            for lane, n in step:
                sh.append(lane, n)
            assert free - pool.num_free == need
            sh.step()
        elif op == "drop":  # a token fed before it was known, then not kept (overlap mode)
            leaf = data.draw(st.sampled_from(leaves), label="lane")
            lane, used, applied = leaf.lane, pool.num_used, len(sh.copies)
            try:
                sh.append(lane, 1)
            except PoolExhausted:
                continue
            sh.step()
            cow = len(sh.copies) > applied
            lane.drop_last()
            sh.tokens[id(lane)].pop()
            if not cow:
                assert pool.num_used == used, "dropping the slot kept a page it opened"
        elif op == "fork":
            leaf = data.draw(st.sampled_from(leaves), label="lane")
            k = data.draw(st.integers(1, 3), label="k")
            used = pool.num_used
            leaf.forked, leaf.prefix_len = leaf.lane, leaf.lane.num_tokens
            leaf.children = [Node(c, leaf) for c in _fork(sh, leaf.lane, k)]
            leaf.lane = None
            assert pool.num_used == used and pool.pending_copies == []
        elif op == "join":
            ready = [
                f for r in roots for f in _forks(r) if all(c.lane is not None for c in f.children)
            ]
            if not ready:
                continue
            f = data.draw(st.sampled_from(ready), label="fork")
            event(f"join at fork depth {f.children[0].lane.fork_depth}")
            prefix = f.forked if data.draw(st.booleans(), label="pass prefix") else None
            used = pool.num_used
            f.lane = _join(sh, [c.lane for c in f.children], f.prefix_len, prefix)
            f.children, f.forked = [], None
            assert pool.num_used <= used and pool.pending_copies == []
        elif op == "release":
            leaf = data.draw(st.sampled_from(leaves), label="lane")
            leaf.lane.release()
            remove(leaf)
        else:  # preempt a whole request
            root = data.draw(st.sampled_from(roots), label="request")
            for leaf in list(_leaves(root)):
                leaf.lane.release()
            roots.remove(root)
        check()

    event(f"copy-on-write copies: {min(len(sh.copies), 3)} (3 = 3 or more)")
    for leaf in live():
        leaf.lane.release()
    pool.check([])
    assert pool.num_used == 0 and pool.num_free == num_pages - 1
    assert pool.pending_copies == []
    assert pool.peak_used <= num_pages - 1
