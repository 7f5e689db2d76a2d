"""The engine: requests in, tokens out, one step (schedule -> execute -> update) at a time.

The offline `LLM` on top of it is in `offline.py`; the server drives it from its own thread."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..models import check_device_supported, check_model_supported, eos_token_ids, load_model, resolve_model
from ..profiling.profile import ModelIdentity, find_profile, head_dim_of, layer_windows
from . import kvquant
from .block_manager import BlockManager
from .cache import CacheConfig, CacheUsage, HeadSplitCache
from .grammar import Grammars
from .heads import HeadSplit, choose_split
from .integration import Kernels, ModelIntegration
from .messages import RunnerOutput, SchedulerOutput
from .output import process_all
from .pipeline import PipelinedDecode
from .requests import RequestError, RequestLimits
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import RequestOutput, SamplingParams, Sequence, Status


log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    budget: float | None = None  # fraction of KV heads with a full cache; None: the profile's default_budget
                                 # (1.0 without a profile), as `rheads serve` does without --budget
    threshold: float | None = None  # or: every KV head scoring above this keeps a full cache
    sink: int = 64
    window: int | None = None  # None: the profile's calibrated default_window, else DEFAULT_WINDOW
    page_size: int = 16
    kv_cache_memory: int | float = 512 << 20  # bytes for both pools, or (on CUDA) a fraction of the free memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_cache_dtype: str = "auto"  # the pools' entries: the model's dtype, or "fp8" (e4m3, scales per layer and KV
                                  # head from a calibration prompt at start-up: kvquant.py)
    cuda_graphs: bool = True  # on CUDA, replay captured graphs for pure decode steps
    async_decode: bool | None = None  # pipelined decode steps (see LLMEngine.step); None: on for CUDA
    enable_prefix_caching: bool = True  # reuse cached prompt prefixes (prefix_cache.py), as vLLM by default
    snapshot_slots: int | None = None  # window slots for prefix snapshots alone; None: max_num_seqs // 8
                                       # (at least 1) with prefix caching and streaming heads, else 0


DEFAULT_WINDOW = 256


@dataclass(frozen=True)
class StepStats:
    """What one engine step did and how long it took: the server's step metrics and the GPU benchmark's
    step-time-versus-hardware-limit figure read it. `seconds` is the wall time of the `step()` call
    that launched it, which waits on the device: a synchronous step reads its own tokens back; a
    pipelined one (async decode) reads back the step before it, so in a run of them each call lasts
    one device step."""

    decode_only: bool  # every scheduled sequence fed exactly one token
    num_seqs: int
    num_tokens: int
    seconds: float
    kv_bytes: int  # KV bytes held after the step: what a decode-only step's attention reads

    @classmethod
    def of(cls, scheduled: SchedulerOutput, seconds: float, kv_bytes: int) -> "StepStats":
        n = len(scheduled.chunks)
        return cls(scheduled.num_tokens == n, n, scheduled.num_tokens, seconds, kv_bytes)


def cache_config_of(config: EngineConfig, memory: int) -> CacheConfig:
    """The KV cache's settings for an engine's: `memory` bytes for both pools."""
    snapshots = config.snapshot_slots
    if snapshots is None:
        snapshots = max(1, config.max_num_seqs // 8) if config.enable_prefix_caching else 0
    return CacheConfig(page_size=config.page_size, sink=config.sink, window=config.window, memory_bytes=memory,
                       max_num_seqs=config.max_num_seqs, snapshot_slots=snapshots, dtype=config.dtype,
                       device=config.device, kv_cache_dtype=config.kv_cache_dtype)


def served_windows(model_config, max_model_len: int) -> list[int | None]:
    """The sliding layers' windows as served: a window as long as a sequence can be needs no more ring."""
    return [w and min(w, max_model_len) for w in layer_windows(model_config)]


def cache_memory(config: EngineConfig) -> int:
    """The bytes of KV memory `config` asks for: given, or a fraction of what is free now that the weights
    are on the device."""
    memory = config.kv_cache_memory
    if isinstance(memory, float):
        memory = int(torch.cuda.mem_get_info(torch.device(config.device))[0] * memory)
    return memory


def load_served(model_spec: str | None, profile: str | Path | None = "auto", config: EngineConfig | None = None,
                trust_remote_code: bool = False) -> tuple[object, object, HeadSplit, EngineConfig, str]:
    """What `LLMEngine.from_model` serves: the model, its tokenizer, its heads from its profile ("auto": the
    shipped one; None: full cache), the config with the profile's window where it gives none, the name."""
    config = config or EngineConfig()
    source = resolve_model(model_spec)
    model, tokenizer = load_model(source, dtype=config.dtype, device=config.device,
                                  trust_remote_code=trust_remote_code)
    identity = ModelIdentity.from_config(model.config, source.name)
    path = None if profile is None else find_profile(source.name) if profile == "auto" else profile
    split, window = choose_split(identity, path, config.budget, config.threshold,
                                 config.max_model_len or model.config.max_position_embeddings)
    if config.window is None:
        config = replace(config, window=window)
    return model, tokenizer, split, config, source.name


class LLMEngine:
    runner_class = ModelRunner  # tensor parallelism's rank 0 runs one that hands each step to the other ranks

    def __init__(self, model, tokenizer, split: HeadSplit, config: EngineConfig, model_name: str = "model"):
        config = config if config.window is not None else replace(config, window=DEFAULT_WINDOW)
        self.model, self.tokenizer, self.config, self.split = model, tokenizer, config, split
        self.model_name = model_name
        check_model_supported(model)
        check_device_supported(model, config.device)
        kvquant.check_supported(config.kv_cache_dtype, config.dtype, config.device)
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        split = self.split = split.with_windows(served_windows(model.config, self.max_model_len))
        head_dim = head_dim_of(model.config)
        self.cache = self._allocate_cache(split, head_dim)
        # The engine owns the model from here to `close` (the cache was allocated first, so a memory too
        # small to hold a sequence fails before the model is touched).
        self.integration = ModelIntegration(model, split, Kernels(
            config.device, config.dtype, head_dim, config.sink, config.window, config.max_num_batched_tokens,
            self.max_model_len))
        try:
            self.blocks = BlockManager(self.cache, config.enable_prefix_caching)
            self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, self.max_model_len,
                                       eos_token_ids(model, tokenizer))
            self.runner = self.runner_class(model, self.cache, self.blocks.block_tables, self.max_model_len,
                                            config.cuda_graphs, self.scheduler.eos_ids)
            self.runner.capture_graphs(min(config.max_num_seqs, self.cache.num_seq_slots))
        except BaseException:
            self.integration.undo()
            raise
        self.pipeline = PipelinedDecode(self.scheduler, self.runner)
        self.async_decode = config.device.startswith("cuda") if config.async_decode is None else config.async_decode
        self.limits = RequestLimits(model.config.vocab_size, self.max_model_len, self.cache.token_capacity)
        self.grammars = Grammars(tokenizer, model.config.vocab_size, self.scheduler.eos_ids)
        self.sequences: dict[str, Sequence] = {}
        self.last_step: StepStats | None = None
        self._arrivals = itertools.count()
        try:
            self._calibrate_kv_scales()
        except BaseException:
            self.close()
            raise

    def _calibrate_kv_scales(self) -> None:
        """An fp8 cache's scales, from one prefill of `kvquant.calibration_prompt`, then fixed. It runs in one
        chunk, past the prefix cache (still empty: no snapshot point splits the chunk, nothing is registered
        or counted), so that no entry is read under a scale grown after it was written; its request ends,
        which leaves the pools empty."""
        if not self.cache.quantized:
            return
        capacity = self.cache.token_capacity
        length = min(kvquant.CALIBRATION_TOKENS, self.config.max_num_batched_tokens, self.max_model_len - 1,
                     *(() if capacity is None else (capacity - 1,)))
        ids = kvquant.calibration_prompt(self.tokenizer, self.model.config.vocab_size, max(1, length))
        prefix, self.blocks.prefix = self.blocks.prefix, None
        self.cache.start_calibration()
        try:
            self.add_request(kvquant.CALIBRATION_ID, ids, SamplingParams(max_tokens=1, temperature=0.0,
                                                                         ignore_eos=True))
            while self.has_unfinished() or self.pipeline.in_flight is not None:
                self.step()
        finally:
            self.cache.finish_calibration()
            self.blocks.prefix = prefix
        log.info("fp8 KV scales from a %d-token calibration prompt: K %.3g-%.3g, V %.3g-%.3g", len(ids),
                 *(float(f(self.cache.scales[i])) for i in (0, 1) for f in (torch.min, torch.max)))

    def _allocate_cache(self, split: HeadSplit, head_dim: int) -> HeadSplitCache:
        """The KV cache of this process's heads (tensor parallelism's rank 0 sizes it to every rank's)."""
        return HeadSplitCache(split, head_dim, cache_config_of(self.config, cache_memory(self.config)))

    def close(self) -> None:
        """Abort what is unfinished and give the model back as it was loaded (heads, attention, forwards)."""
        for request_id in list(self.sequences):
            self.abort(request_id)
        self.pipeline.in_flight = None
        self.integration.undo()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_model(cls, model_spec: str | None, profile: str | Path | None = "auto",
                   config: EngineConfig | None = None, trust_remote_code: bool = False) -> "LLMEngine":
        """Load a model and choose its heads from its profile ("auto": the shipped one; None: full cache)."""
        model, tokenizer, split, config, name = load_served(model_spec, profile, config, trust_remote_code)
        return cls(model, tokenizer, split, config, model_name=name)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    validated: bool = False) -> None:
        """Queue a request; RequestError if it can never run here (`limits`; a caller that has checked it
        there already, as the server's handlers do, says `validated`) or its id is running."""
        if request_id in self.sequences:
            raise RequestError(f"request id {request_id!r} is already running")
        if not validated:
            self.limits.validate(prompt_ids, params)
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        matcher = None if params.grammar is None else self.grammars.matcher(params.grammar)
        seq = Sequence(request_id, list(prompt_ids), params, arrival=next(self._arrivals), generator=generator,
                       matcher=matcher)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its cache; True if it was still unfinished."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """Finish every unfinished request with `error` (a forward pass that keeps failing); their outputs."""
        return [self._fail(seq, error) for seq in list(self.sequences.values())]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def usage(self) -> CacheUsage:
        return self.blocks.usage()

    @property
    def prefix_cache_totals(self) -> tuple[int, int]:
        """Tokens looked up in the prefix cache and found there, since start ((0, 0) with it off)."""
        prefix = self.blocks.prefix
        return (prefix.queries, prefix.hits) if prefix else (0, 0)

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache (vLLM's `POST /reset_prefix_cache`); running requests go on unharmed."""
        self.blocks.reset_prefix_cache()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def all_decoding(self) -> bool:
        """Every unfinished request has its prompt in the cache and generates one token a step."""
        return not self.scheduler.waiting and all(not s.in_prefill and s.num_cached for s in self.scheduler.running)

    # -- the step -----------------------------------------------------------------------------------
    def prepare_thread(self) -> None:
        """Start-up work of the thread that steps the engine (`ModelIntegration.prepare_thread`); `step`
        calls it, a server calls it before it takes requests."""
        self.integration.prepare_thread(self.runner.plans)

    def step(self) -> list[RequestOutput]:
        """Schedule, execute one forward pass, update, and report what each touched request produced.

        With async decode (on for CUDA), decode steps are pipelined (`PipelinedDecode`): a request's token
        arrives one call later. A failure while sampling or processing one request's token finishes that
        request alone with finish_reason "error"; a failure in the forward pass raises, and the step may
        be retried (`Scheduler.failed` says what is kept)."""
        self.prepare_thread()
        start = time.perf_counter()
        outputs = []
        if self.pipeline.in_flight is not None:
            launched, outputs = self.pipeline.step(self._update)
            if launched is not None:
                self._record(start, launched)
                return outputs
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            return outputs
        try:
            result = self.runner.execute(scheduled, defer=self.async_decode)
        except Exception:
            self.scheduler.failed(scheduled)
            raise
        outputs += self._update(scheduled, self.pipeline.hold(result))
        self._record(start, scheduled)
        return outputs

    def _update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """The scheduler's update, then the output processor; a stop string finishes its request here, and
        a token that fails to process fails its request alone."""
        outputs = []
        for seq, out in process_all(self.tokenizer, self.scheduler.update(scheduled, result)):
            if isinstance(out, Exception):
                outputs.append(self._fail(seq, out))
                continue
            if out.finished:
                self._finish(seq, out.finish_reason)
            outputs.append(out)
        return outputs

    def _record(self, start: float, scheduled: SchedulerOutput) -> None:
        self.last_step = StepStats.of(scheduled, time.perf_counter() - start, self.blocks.bytes_used())

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End a request: its cache back to the pools, its id free again (a finished one keeps its place
        out of the scheduler; a stop string may still say why it ended)."""
        if seq.status is Status.FINISHED:
            seq.finish_reason = reason
        else:
            self.scheduler.finish(seq, reason)
        self.sequences.pop(seq.request_id, None)

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Finish one request with an error and give its cache back."""
        log.error("request %s failed: %s: %s", seq.request_id, type(error).__name__, error)
        self._finish(seq, "error")
        return RequestOutput.failure(seq.request_id, f"{type(error).__name__}: {error}", len(seq.prompt_ids),
                                     len(seq.output_ids))
