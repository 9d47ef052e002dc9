"""Which requests decode: admission in arrival order, and preemption of the newest.

Requests wait in arrival order. The one at the front is admitted while the pool has pages for
it (a fresh request: its prompt and a page per sample; a preempted one: the KV its lanes held
and the tokens they hold unfed) plus a page of headroom per lane under way, while the lanes
fit ``max_lanes`` and the running requests ``max_running``. With nothing running, it is
admitted whatever is free. When a step's appends do not fit, the engine preempts the newest
running request: it goes back to the front of the queue with its lanes, to be rebuilt when it
is admitted again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from .kv import PagePool
from .lanes import Request


class Scheduler:
    """The waiting and running requests of one :meth:`~.engine.Engine.generate` call.
    ``claim(index)`` is asked once, as a fresh request would be admitted: a request it refuses
    is dropped (another process runs it)."""

    def __init__(
        self,
        requests: Iterable[Request],
        pool: PagePool,
        max_lanes: int,
        max_running: int | None = None,
        claim: Callable[[int], bool] | None = None,
    ) -> None:
        self.waiting: deque[Request] = deque(requests)
        self.running: list[Request] = []
        self.pool = pool
        self.max_lanes = max_lanes
        self.max_running = max_running
        self.claim = claim

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> list[Request]:
        """Move the requests that fit from the front of the queue to the running ones; returns
        them (a preempted one holds its samples, a fresh one none)."""
        admitted: list[Request] = []
        lanes = sum(len(s.live_lanes()) for r in self.running for s in r.samples)
        free = self.pool.num_free
        while self.waiting:
            request = self.waiting[0]
            need = self.pages_to_admit(request)
            if request.samples:
                new_lanes = sum(len(s.live_lanes()) for s in request.samples)
            else:
                new_lanes = request.params.n
            busy = self.running or admitted
            at_cap = self.max_running is not None and (
                len(self.running) + len(admitted) >= self.max_running
            )
            # a page of headroom per lane under way: admitting into the last free pages
            # would have the next steps preempt the newcomer, its prefill wasted
            if busy and (need + lanes > free or lanes + new_lanes > self.max_lanes or at_cap):
                break
            self.waiting.popleft()
            if not request.samples and self.claim is not None and not self.claim(request.index):
                continue
            admitted.append(request)
            free -= need
            lanes += new_lanes
        self.running.extend(admitted)
        return admitted

    def pages_to_admit(self, request: Request) -> int:
        """The pages ``request`` takes when admitted (headroom for the steps after not counted):
        a fresh one its prompt's and the page of each sample's first token; a preempted one
        :meth:`pages_to_resume`."""
        if request.samples:
            return self.pages_to_resume(request)
        return self.pool.pages_for(len(request.prompt_ids)) + request.params.n

    def pages_to_resume(self, request: Request) -> int:
        """At most the pages a preempted request's rebuild and its next step take: the
        prompt's, and for each lane its tokens (those fed again and those it holds unfed, such
        as a branch's header) plus the page a fork's shared tail is copied to."""
        lanes = [lane for s in request.samples if s.live_lanes() for lane in s.lanes]
        return self.pool.pages_for(len(request.prompt_ids)) + sum(
            self.pool.pages_for(len(lane.tokens)) + 1 for lane in lanes
        )

    def preempt(self) -> Request:
        """Take the newest running request back to the front of the queue; returns it."""
        victim = max(self.running, key=lambda r: r.arrival)
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        return victim

    def retire(self, finished: Callable[[Request], bool]) -> None:
        """Drop the running requests ``finished`` says are done."""
        self.running = [r for r in self.running if not finished(r)]

    def parked(self) -> list[Request]:
        """The preempted requests: they wait at the front of the queue, holding their samples."""
        parked = []
        for request in self.waiting:
            if not request.samples:
                break
            parked.append(request)
        return parked
