"""Sums of products: problems whose parts are independent, with ground truth and NPR traces.

A problem is ``Compute 7*8 + 6*9.``: each product can be worked out on its own (one plan and one
parallel step per product), and the takeaway adds the partial results. The canonical trace spells
out exactly what the constrained engine asks the model to write around the text it forces itself
(see ``npr_graph/engine/structure.py``): the engine writes ``<guideline>\\n<plan>``, each plan's
``k:``, the newline after each ``</plan>``, the ``<step>\\nk:`` headers, ``<takeaway>\\n`` and the
newline after ``</takeaway>``; the model writes the rest (plan, step and takeaway contents, when
to close the guideline, the answer). So SFT on these traces teaches exactly the tokens the engine
will ask the model for.

A *sloppy teacher* can write flawed traces (:data:`FLAWS`): ``lazy`` plans only the first
product and answers with it (an under-parallel trace), ``redundant`` plans the first product
again instead of the last (parallel, one branch wasted), ``carry`` adds without carrying. The
demo uses them to give a few-minute SFT a systematic weakness that the accuracy reward can fix.

Everything is a pure function of a seed, so training and held-out sets are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The demo's problems: two products of factors 4..9. Every product then has two digits, so the
# sum's digits sit at fixed offsets from its addends, the layout a few-layer model learns fastest
# (measured: 49% vs 26% held-out accuracy after the same 600 SFT steps with factors 2..9).
MIN_TERMS = MAX_TERMS = 2
MIN_FACTOR, MAX_FACTOR = 4, 9

FLAWS = (None, "lazy", "redundant", "carry")


@dataclass(frozen=True)
class Problem:
    """A sum of products, e.g. ``((7, 8), (6, 9))`` for ``7*8 + 6*9``."""

    terms: tuple[tuple[int, int], ...]

    @property
    def text(self) -> str:
        """The prompt: ``Compute 7*8 + 6*9.``"""
        return "Compute " + " + ".join(f"{a}*{b}" for a, b in self.terms) + "."

    @property
    def products(self) -> list[int]:
        return [a * b for a, b in self.terms]

    @property
    def answer(self) -> int:
        """The ground truth."""
        return sum(self.products)

    @property
    def carries(self) -> bool:
        """Whether adding the products needs a carry."""
        return carryless_sum(self.products) != self.answer

    def _worked(self, flaw: str | None) -> tuple[tuple[tuple[int, int], ...], int]:
        """The terms a (possibly sloppy) teacher works out, and the answer it reaches."""
        if flaw not in FLAWS:
            raise ValueError(f"unknown flaw {flaw!r}; expected one of {FLAWS}")
        terms = {
            "lazy": self.terms[:1],
            "redundant": self.terms[:1] + self.terms[:-1],
        }.get(flaw or "", self.terms)
        products = [a * b for a, b in terms]
        return terms, carryless_sum(products) if flaw == "carry" else sum(products)

    def trace(self, flaw: str | None = None) -> str:
        """The canonical NPR trace: one plan and one step per product, a takeaway adding them.

        ``flaw`` makes it a sloppy teacher's trace: ``"lazy"`` plans and computes only the first
        product and answers with it; ``"redundant"`` plans the first product in place of the last;
        ``"carry"`` adds the products forgetting the carries."""
        terms, result = self._worked(flaw)
        products = [a * b for a, b in terms]
        plans = "".join(f"<plan>{i}: {a}*{b}</plan>\n" for i, (a, b) in enumerate(terms, 1))
        steps = "".join(
            f"<step>\n{i}: {a}*{b}={a * b}\n</step>\n" for i, (a, b) in enumerate(terms, 1)
        )
        total = "+".join(str(p) for p in products) + f"={result}"
        return (
            f"<guideline>\n{plans}</guideline>\n{steps}"
            f"<takeaway>\n{total}\n</takeaway>\n"
            f"The answer is \\boxed{{{result}}}."
        )

    def record(self, flaw: str | None = None) -> dict[str, str]:
        """A data record: ``problem`` and the true ``answer`` (PAPO), and the SFT ``response``."""
        return {"problem": self.text, "answer": str(self.answer), "response": self.trace(flaw)}


def carryless_sum(values: Iterable[int]) -> int:
    """Column addition that forgets every carry: each column's digit sum modulo 10, the leftmost
    column in full (``49+63`` gives ``102``, not ``112``)."""
    numbers = [str(v) for v in values]
    width = max(map(len, numbers))
    total = 0
    for column in range(width):
        digits = sum(int(n.rjust(width, "0")[column]) for n in numbers)
        total = total * 10 + (digits if column == 0 else digits % 10)
    return total


def teacher_flaws(
    problems: Sequence[Problem], flaw: str | None, rate: float, seed: int
) -> list[str | None]:
    """The flaw of each trace a sloppy teacher writes: ``flaw`` with probability ``rate`` where it
    changes the answer, else None (deterministic for a seed)."""
    if flaw not in FLAWS:
        raise ValueError(f"unknown flaw {flaw!r}; expected one of {FLAWS}")
    rng = random.Random(seed)
    out: list[str | None] = []
    for problem in problems:
        hit = rng.random() < rate  # drawn for every problem: flaws stay aligned across rates
        wrong = problem._worked(flaw)[1] != problem.answer
        out.append(flaw if hit and wrong else None)
    return out


def random_problem(
    rng: random.Random,
    min_terms: int = MIN_TERMS,
    max_terms: int = MAX_TERMS,
    min_factor: int = MIN_FACTOR,
    max_factor: int = MAX_FACTOR,
) -> Problem:
    count = rng.randint(min_terms, max_terms)
    return Problem(
        tuple(
            (rng.randint(min_factor, max_factor), rng.randint(min_factor, max_factor))
            for _ in range(count)
        )
    )


def generate(
    count: int,
    seed: int,
    *,
    min_terms: int = MIN_TERMS,
    max_terms: int = MAX_TERMS,
    min_factor: int = MIN_FACTOR,
    max_factor: int = MAX_FACTOR,
    exclude: Iterable[Problem] = (),
) -> list[Problem]:
    """``count`` distinct problems, none in ``exclude``; deterministic for a given seed."""
    if not 1 <= min_terms <= max_terms:
        raise ValueError("need 1 <= min_terms <= max_terms")
    if not 0 <= min_factor <= max_factor <= 9:
        raise ValueError("need 0 <= min_factor <= max_factor <= 9")
    values = max_factor - min_factor + 1
    space = sum(values ** (2 * n) for n in range(min_terms, max_terms + 1))
    seen = set(exclude)
    if count > space - len(seen):
        raise ValueError(f"at most {space - len(seen)} distinct problems are left, not {count}")
    rng = random.Random(seed)
    out: list[Problem] = []
    while len(out) < count:
        problem = random_problem(rng, min_terms, max_terms, min_factor, max_factor)
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def split(train: int, test: int, seed: int, **options: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint training and held-out sets (``options``: those of :func:`generate`). The held-out
    set is drawn first, so it does not depend on the training set's size."""
    held_out = generate(test, seed * 2 + 1, **options)
    training = generate(train, seed * 2, exclude=held_out, **options)
    return training, held_out
