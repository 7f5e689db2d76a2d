"""The serving engine: head-split KV cache, continuous batching scheduler, model runner, sampler."""

from .heads import HeadSplit, random_split, select_heads
from .llm import EngineConfig, LLMEngine
from .offline import LLM
from .requests import EngineBrokenError, RequestError, RequestLimits
from .sequence import RequestOutput, SamplingParams

__all__ = ["LLM", "EngineBrokenError", "EngineConfig", "HeadSplit", "LLMEngine", "RequestError", "RequestLimits", "RequestOutput",
           "SamplingParams", "random_split", "select_heads"]
