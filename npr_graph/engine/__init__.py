"""The parallel executor: paged KV, lanes, scheduler, model runner."""

from .engine import Engine, EngineStats
from .sampling import SamplingParams

__all__ = ["Engine", "EngineStats", "SamplingParams"]
