"""Offline batch generation on the engine, in the spirit of vLLM's `LLM`: every prompt submitted, then stepped.

    llm = LLM("smollm2-135m-instruct", budget=0.5)
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .llm import EngineConfig, LLMEngine
from .sequence import RequestOutput, SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list


def generate_all(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]],
                 on_finish: Callable[[int], None] | None = None) -> list[Completion]:
    """Submit every request at once, step the engine until all have finished, return them in order.

    on_finish(i) is called as request i finishes (progress bars).
    """
    parts: dict[str, list[RequestOutput]] = {}
    for i, (prompt_ids, params) in enumerate(requests):
        engine.add_request(f"batch-{i}", prompt_ids, params)
        parts[f"batch-{i}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            parts[out.request_id].append(out)
            if out.finished and on_finish is not None:
                on_finish(int(out.request_id.split("-")[1]))
    completions = []
    for i, (prompt_ids, _) in enumerate(requests):
        outs = parts[f"batch-{i}"]
        completions.append(Completion(f"batch-{i}", prompt_ids, [t for o in outs for t in o.new_token_ids],
                                      "".join(o.new_text for o in outs), outs[-1].finish_reason,
                                      [lp for o in outs for lp in o.new_logprobs]))
    return completions


class LLM:
    """Offline batch generation: the model loaded with its profile, every prompt submitted, then stepped."""

    def __init__(self, model: str | None = None, profile: str | Path | None = "auto", **config):
        self.engine = LLMEngine.from_model(model, profile, EngineConfig(**config))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None) -> list[Completion]:
        params = params or SamplingParams()
        ids = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        return generate_all(self.engine, [(prompt_ids, params) for prompt_ids in ids])
