"""Host time the engine spends planning one decode step, at RL-group sizes.

On a GPU a decode step is bound by the host (docs/GPU.md), so the per-step work of the runner
counts: appending each lane's slot, the views of every lane, and the attention backend's page
table. This times, side by side in one run:

* the padded slot table (the torch path) as the engine builds it (each lane's flat slots cached
  and appended to) against rebuilding it from the lanes' segments every step (how it was built
  before);
* the kernels' flat page table built from the cached views directly (``SlotViews``: the lanes'
  slot lists concatenated) against padding them into the table and cutting each row out again
  (how it was built before), and the cascade levels.

Each comparison first checks that both sides build the same table (the run stops with an error if
they differ), then times ``repeats`` rounds alternating the sides (in turn, the order swapped every
round), so drift on a shared machine hits both alike; each side's median per call.

    python benchmarks/step_planning.py [--cases 8x1024,64x2304,128x4352] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npr_graph.engine.backends import cascade_levels, flat_level  # noqa: E402
from npr_graph.engine.kv import (  # noqa: E402
    LaneKV,
    PagePool,
    SlotTable,
    SlotViews,
    _concat_ranges,
    slot_table,
)


def rebuilt_slot_table(lanes: list[LaneKV]) -> SlotTable:
    """The slot table from the lanes' segments, every step (the engine's earlier approach)."""
    bases, sizes, lengths = [], [], []
    for lane in lanes:
        ps = lane.pool.page_size
        for seg in lane.segments:
            if seg.size:
                bases.append(seg.page * ps + seg.start)
                sizes.append(seg.size)
        lengths.append(lane.num_tokens)
    lens = torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(max(lengths, default=0)) < lens[:, None]
    slots = torch.zeros(mask.shape, dtype=torch.long)
    slots[mask] = _concat_ranges(bases, sizes)
    return SlotTable(slots, mask, lens)


def padded_page_table(lanes: list[LaneKV]) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat page table (indptr, indices) cut out of the padded slot table (the engine's
    earlier approach)."""
    table = slot_table(lanes)
    lengths = table.lengths.to(torch.int32)
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=indptr[1:])
    rows = [row[:n] for row, n in zip(table.slots, lengths.tolist(), strict=True)]
    return indptr, torch.cat(rows).to(torch.int32)


OWN_TOKENS = 256


def group(lanes: int, tokens: int) -> list[LaneKV]:
    """One prompt forked into ``lanes`` samples, each with ``OWN_TOKENS`` tokens of its own:
    ``tokens`` in each lane's view."""
    if tokens < OWN_TOKENS:
        raise ValueError(f"a view of {tokens} tokens cannot hold a lane's own {OWN_TOKENS}")
    pool = PagePool(4 + lanes * (tokens // 16 + 20), 16)
    prompt = LaneKV(pool)
    prompt.append_slots(tokens - OWN_TOKENS)
    out = prompt.fork(lanes)
    for lane in out:
        lane.append_slots(OWN_TOKENS)
    return out


def timed(fn, repeats: int) -> float:
    """Mean ms per call over ``repeats`` calls in a row, after one untimed (one side alone)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def alternated(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each side once untimed, then ``repeats`` rounds calling the sides in turn (the order
    reversed every other round); each side's median ms per call."""
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def check_equal(lanes: list[LaneKV]) -> None:
    """Both ways of building each table give the same one; raises (not ``assert``: ``python -O``
    would skip it) when they differ."""
    table, rebuilt = slot_table(lanes), rebuilt_slot_table(lanes)
    for field in SlotTable._fields:
        if not torch.equal(getattr(table, field), getattr(rebuilt, field)):
            raise RuntimeError(
                f"the cached slot table differs from the one rebuilt from segments in {field}"
            )
    level = flat_level(SlotViews.of(lanes))
    indptr, indices = padded_page_table(lanes)
    if not (torch.equal(level.kv_indptr, indptr) and torch.equal(level.kv_indices, indices)):
        raise RuntimeError("the flat page table differs from the one cut out of the padded table")


def bench(lanes_n: int, tokens: int, repeats: int) -> dict:
    lanes = group(lanes_n, tokens)
    check_equal(lanes)

    def step_cached():
        for lane in lanes:
            lane.append_slots(1)
        return slot_table(lanes)

    def step_rebuilt():
        for lane in lanes:
            lane.append_slots(1)
        return rebuilt_slot_table(lanes)

    def append_only():
        for lane in lanes:
            lane.append_slots(1)

    append_us = timed(append_only, 10 * repeats) * 1e3 / lanes_n
    # Both sides append one slot per lane per call: alternated, they see the same view lengths.
    slot_ms = alternated({"cached": step_cached, "rebuilt": step_rebuilt}, repeats)
    cached, rebuilt = slot_ms["cached"], slot_ms["rebuilt"]
    check_equal(lanes)
    keys = [[0] * lanes_n, list(range(lanes_n))]
    page_ms = alternated(
        {
            "flat": lambda: flat_level(SlotViews.of(lanes)),
            "padded": lambda: padded_page_table(lanes),
        },
        repeats,
    )
    page_table, padded = page_ms["flat"], page_ms["padded"]
    return {
        "lanes": lanes_n,
        "tokens": tokens,
        "append_us_per_lane": append_us,
        "slot_table_cached_ms": cached,
        "slot_table_rebuilt_ms": rebuilt,
        "speedup": rebuilt / cached,
        "page_table_ms": page_table,
        "page_table_from_padded_ms": padded,
        "page_table_speedup": padded / page_table,
        "cascade_levels_ms": timed(lambda: cascade_levels(SlotViews.of(lanes), keys), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="8x1024,64x2304,128x4352", help="lanes x view tokens")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for case in args.cases.split(","):
        lanes, tokens = (int(x) for x in case.split("x"))
        if tokens < OWN_TOKENS or lanes < 1:
            parser.error(f"--cases {case}: each lane's view holds its own {OWN_TOKENS} tokens")
        print(json.dumps({k: round(v, 3) for k, v in bench(lanes, tokens, args.repeats).items()}))


if __name__ == "__main__":
    main()
