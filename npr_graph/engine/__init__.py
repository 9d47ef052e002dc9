"""The parallel executor: paged KV, lanes, scheduler, model runner."""

from .engine import Engine, EngineStats, PromptError
from .sampling import SamplingParams

__all__ = ["Engine", "EngineStats", "PromptError", "SamplingParams"]
