"""Tensor parallelism over the processes of one host, with each layer's retrieval heads balanced over the ranks.

vLLM and SGLang give rank r the KV heads [r kv/N, (r+1) kv/N) of every layer (`contiguous_plan`). Under a
head split that is unbalanced: the retrieval heads of a layer are where the profile found them, so one rank
may hold most of them, and with them most of the pages and of the attention's time. Since rheads chooses
each layer's head order at load time anyway (`heads.py`), it can choose which heads each rank gets:
`balanced_plan` gives every rank the same number of a layer's retrieval heads (and so of its streaming
heads), as far as the counts divide.

The model is sharded as Megatron-LM shards it: each rank keeps its plan's query and KV heads of q/k/v
(column-parallel) and its share of gate/up, and o and down become row-parallel, their partial outputs
summed by one all-reduce each. The embedding and the LM head are replicated (every rank computes the
logits; rank 0 alone samples): the simplest, at the cost of their memory on every rank. Each rank serves
its heads through the ordinary engine path, its own cache holding only them (`ShardPlan.rank_split`).
Rank 0 runs the whole engine (scheduler, block manager, sampling) and hands each step's chunks to the
other ranks before its forward (`BroadcastingRunner`); they replay it (`follow`). Every rank's pools have
the same numbers of pages and window slots (the smallest any rank's memory holds), so the page and slot
numbers rank 0 hands out mean the same on every rank, and admission there counts every rank's pools.

Prefix caching is decided on rank 0 like every allocation; what it does to the slots' contents (a snapshot
of the streaming heads copied or restored, a slot cleared for a recompute) rank 0's cache keeps for the
next step to take along (`_SlotLog`), so every rank's slots hold the same positions' entries of its own heads.

Not yet: pipelined decode (its tokens stay on rank 0's device) and CUDA graphs (captured per rank, and the
followers would need them replayed).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..profiling.profile import head_dim_of
from .block_manager import BlockManager
from .cache import CacheConfig, Footprint, HeadSplitCache, PoolSizes, recompute_span
from .fused import LLAMA_STYLE_ATTENTION, LLAMA_STYLE_LAYERS, LLAMA_STYLE_MLPS
from .heads import HeadSplit, _rows
from .integration import Kernels, ModelIntegration
from .llm import DEFAULT_WINDOW, EngineConfig, LLMEngine, cache_config_of, cache_memory, load_served, served_windows
from .messages import Chunk
from .requests import EngineBrokenError
from .runner import ModelRunner


@dataclass(frozen=True)
class ShardPlan:
    """Which KV heads each rank holds in every layer: `kv_heads[rank][layer]`, original head indices in the
    rank's cache order (its retrieval heads first, then its streaming heads). A KV head's query heads
    (its GQA group) go with it, so a plan of KV heads is the whole attention's."""

    split: HeadSplit
    kv_heads: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.kv_heads)

    def full_counts(self, rank: int) -> list[int]:
        """Retrieval KV heads of each layer on `rank`."""
        return [sum(h in full for h in heads) for heads, full in zip(self.kv_heads[rank], self.split.full)]

    def query_heads(self, rank: int, layer: int, group: int) -> list[int]:
        """The original query heads `rank` holds in `layer`, in its order: each KV head's group of `group`."""
        return [h * group + i for h in self.kv_heads[rank][layer] for i in range(group)]

    def rank_split(self, rank: int) -> HeadSplit:
        """The head split of `rank`'s own heads, numbered in its order: its first `full_counts` are full."""
        per_rank = self.split.num_kv_heads // self.world_size
        return HeadSplit(tuple(tuple(range(n)) for n in self.full_counts(rank)), per_rank, self.split.windows)


def _heads_per_rank(split: HeadSplit, world_size: int) -> int:
    if world_size < 1 or split.num_kv_heads % world_size:
        raise ValueError(f"{split.num_kv_heads} KV heads do not divide over {world_size} ranks")
    return split.num_kv_heads // world_size


def contiguous_plan(split: HeadSplit, world_size: int) -> ShardPlan:
    """vLLM's sharding: rank r holds the KV heads [r kv/N, (r+1) kv/N) of every layer, whichever are full
    (in the rank's cache order: its full heads first)."""
    per_rank = _heads_per_rank(split, world_size)
    ranks = []
    for rank in range(world_size):
        heads = range(rank * per_rank, (rank + 1) * per_rank)
        ranks.append(tuple(tuple(sorted(heads, key=lambda h: h not in full)) for full in split.full))
    return ShardPlan(split, tuple(ranks))


def balanced_plan(split: HeadSplit, world_size: int) -> ShardPlan:
    """Every rank holds kv/N KV heads of every layer, of which the layer's f full heads give each rank
    f // N, and the f % N left over go, one each, to the ranks that hold the fewest full heads over the
    layers so far (ties: the lower rank). So in every layer the ranks' full (and so streaming) head counts
    differ by at most one, and their totals over the layers, which size their pages, do too.

    Within a layer a rank takes the full heads in ascending order after the lower ranks', then the
    streaming heads likewise: any order would do, this one is reproducible from the split alone.
    """
    per_rank = _heads_per_rank(split, world_size)
    totals = [0] * world_size
    layers = []  # [layer][rank] -> heads
    for full in split.full:
        base, extra = divmod(len(full), world_size)
        favoured = set(sorted(range(world_size), key=lambda r: (totals[r], r))[:extra])
        counts = [base + (r in favoured) for r in range(world_size)]
        full_heads = sorted(full)
        streaming = [h for h in range(split.num_kv_heads) if h not in full]
        layer, taken_full, taken_streaming = [], 0, 0
        for rank, count in enumerate(counts):
            rest = per_rank - count
            layer.append(tuple(full_heads[taken_full:taken_full + count])
                         + tuple(streaming[taken_streaming:taken_streaming + rest]))
            taken_full, taken_streaming = taken_full + count, taken_streaming + rest
            totals[rank] += count
        layers.append(layer)
    return ShardPlan(split, tuple(tuple(layer[rank] for layer in layers) for rank in range(world_size)))


Sharding = Callable[[HeadSplit, int], ShardPlan]


# --- the sharded model --------------------------------------------------------------------------------

def _keep(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give a linear this rank's slice of its weight, and of its bias (None: it keeps its own)."""
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def _all_reduce_output(module: nn.Module, inputs, output: torch.Tensor) -> None:
    """A row-parallel projection's forward hook: the ranks' partial products summed, in place."""
    dist.all_reduce(output)


def check_shardable(model) -> None:
    """Refuse what `shard_model` would slice wrongly: it knows the Llama-style modules' weights only."""
    layer = model.model.layers[0]
    kinds = type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__
    if (kinds[0] not in LLAMA_STYLE_LAYERS or kinds[1] not in LLAMA_STYLE_ATTENTION or kinds[2] not in LLAMA_STYLE_MLPS
            or model.config.hidden_act != "silu"):
        raise ValueError(f"tensor parallelism shards the Llama-style models ({', '.join(LLAMA_STYLE_LAYERS)}); "
                         f"not {kinds[0]}")


@torch.no_grad()
def shard_model(model, plan: ShardPlan, rank: int) -> None:
    """Keep, in place, `rank`'s slice of the model: its plan's query and KV heads of q/k/v (so its heads
    come in the plan's order, which the head permutation then leaves as it is) and of o's input columns,
    and its contiguous share of the MLP's intermediate features. o's and down's outputs become partial
    sums, all-reduced by a hook; their biases stay on rank 0 alone, so the sum adds them once."""
    check_shardable(model)
    config, world = model.config, plan.world_size
    head_dim, group = head_dim_of(config), config.num_attention_heads // config.num_key_value_heads
    if config.intermediate_size % world:
        raise ValueError(f"an intermediate size of {config.intermediate_size} does not divide over {world} ranks")
    share = config.intermediate_size // world
    features = torch.arange(rank * share, (rank + 1) * share)
    for layer, module in enumerate(model.model.layers):
        attn, mlp = module.self_attn, module.mlp
        kv_heads = torch.tensor(plan.kv_heads[rank][layer])
        q_heads = torch.tensor(plan.query_heads(rank, layer, group))
        for proj, heads in ((attn.q_proj, q_heads), (attn.k_proj, kv_heads), (attn.v_proj, kv_heads)):
            bias = None if proj.bias is None else _rows(proj.bias, heads, head_dim)
            _keep(proj, _rows(proj.weight, heads, head_dim), bias)
        for proj in (mlp.gate_proj, mlp.up_proj):
            _keep(proj, proj.weight[features], None if proj.bias is None else proj.bias[features])
        for proj, columns in ((attn.o_proj, _rows(attn.o_proj.weight.t(), q_heads, head_dim).t()),
                              (mlp.down_proj, mlp.down_proj.weight[:, features])):
            _keep(proj, columns, None if proj.bias is None or rank == 0 else torch.zeros_like(proj.bias))
            proj.register_forward_hook(_all_reduce_output)
    config.head_dim = head_dim  # before the head counts change: a config without one derives it from them
    config.num_attention_heads //= world
    config.num_key_value_heads //= world
    config.intermediate_size = share


# --- one rank's share -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """What a rank serves with: the plan, its own head split, and the settings and pool sizes of its cache."""

    plan: ShardPlan
    rank: int
    split: HeadSplit
    config: EngineConfig
    cache_config: CacheConfig
    sizes: PoolSizes

    def cache(self, head_dim: int, kind: type[HeadSplitCache] = HeadSplitCache) -> HeadSplitCache:
        return kind(self.split, head_dim, self.cache_config, self.sizes)


def prepare_rank(model, split: HeadSplit, config: EngineConfig, sharding: Sharding = balanced_plan) -> Shard:
    """Shard `model` in place for this process's rank of the default process group, under the `sharding`
    plan of `split` (every rank passes the same model, split and sharding; `contiguous_plan` is there to be
    compared with), and agree with the other ranks on the pools' sizes (a collective: every rank calls it)."""
    config = replace(config, window=DEFAULT_WINDOW if config.window is None else config.window,
                     async_decode=False, cuda_graphs=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    max_len = config.max_model_len or model.config.max_position_embeddings
    plan = sharding(split.with_windows(served_windows(model.config, max_len)), world)
    if len({sum(plan.full_counts(r)) > 0 for r in range(world)}) > 1:
        raise ValueError(f"{sum(split.num_full)} retrieval heads cannot give each of {world} ranks one")
    head_dim = head_dim_of(model.config)
    shard_model(model, plan, rank)
    own = plan.rank_split(rank)
    cache_config = cache_config_of(config, cache_memory(config))
    sizes = torch.tensor(PoolSizes.of(Footprint.of(own, head_dim, cache_config), cache_config), device=config.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MIN)  # (a CUDA rank's memory may differ from another's)
    return Shard(plan, rank, own, config, cache_config, PoolSizes(*sizes.tolist()))


# --- the steps, from rank 0 to the others -----------------------------------------------------------------

@dataclass(frozen=True)
class ChunkPlan:
    """What a rank other than 0 needs of one chunk of a step: the sequence's slot and pages, where the chunk
    starts, the tokens it feeds, and whether it reuses cached pages (`Chunk.reuses`)."""

    slot: int
    start: int
    token_ids: list[int]
    samples: bool
    pages: list[int]
    reuses: bool = False

    @classmethod
    def of(cls, chunk: Chunk) -> "ChunkPlan":
        seq, start = chunk.seq, chunk.seq.num_cached
        return cls(seq.slot, start, seq.token_ids(start, start + chunk.num_tokens), chunk.samples, list(seq.pages),
                   chunk.reuses)


@dataclass(frozen=True)
class Step:
    """One step for the other ranks: the slot copies (source, target) and clears (slot, None) rank 0's
    block manager made since the step before, in order, then the chunks."""

    slot_ops: list[tuple[int, int | None]]
    chunks: list[ChunkPlan]

    def apply_slot_ops(self, cache: HeadSplitCache) -> None:
        for source, target in self.slot_ops:
            if target is None:
                cache.clear_slot(source)
            else:
                cache.copy_slot(source, target)


class _SlotLog(HeadSplitCache):
    """Rank 0's cache: it keeps what prefix caching does to the slots' contents for the next `Step`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot_ops: list[tuple[int, int | None]] = []

    def copy_slot(self, source: int, target: int) -> None:
        super().copy_slot(source, target)
        self.slot_ops.append((source, target))

    def clear_slot(self, slot: int) -> None:
        super().clear_slot(slot)
        self.slot_ops.append((slot, None))

    def take_slot_ops(self) -> list[tuple[int, int | None]]:
        ops, self.slot_ops = self.slot_ops, []
        return ops


@dataclass(frozen=True)
class _Replica:
    """The part of a sequence a runner reads, as a follower knows it (`ModelRunner.run`)."""

    plan: ChunkPlan

    @property
    def slot(self) -> int:
        return self.plan.slot

    @property
    def num_cached(self) -> int:
        return self.plan.start

    @property
    def pages(self) -> list[int]:
        return self.plan.pages

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.plan.token_ids[start - self.plan.start:end - self.plan.start]


CALIBRATED = "calibrated"  # rank 0's word that an fp8 cache's calibration prompt has run: scales fixed from here


def _broadcast(step: Step | str | None) -> Step | str | None:
    """Rank 0's step (None: stop; CALIBRATED) to every rank; what rank 0 sent."""
    message = [step]
    dist.broadcast_object_list(message, src=0)
    return message[0]


class BroadcastingRunner(ModelRunner):
    """Rank 0's runner: each forward's chunks go to the other ranks first, so that they run it too. A forward
    that fails here after that leaves them waiting in a collective rank 0 will not reach, and any later
    step's would pair with the wrong one: the group is left (so that theirs fail, on gloo at once) and the
    engine is broken for good (`EngineBrokenError`)."""

    broken: str | None = None

    def run(self, chunks: list[Chunk], input_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.broken:
            raise EngineBrokenError(self.broken)
        if input_tokens is not None:
            raise ValueError("tensor parallelism does not pipeline decode steps")
        _broadcast(Step(self.cache.take_slot_ops(), [ChunkPlan.of(chunk) for chunk in chunks]))
        try:
            return super().run(chunks)
        except Exception as error:
            self.broken = (f"a forward failed on rank 0 after the other ranks had begun it ({error!r}); the "
                           "tensor-parallel group is gone: restart the server")
            dist.destroy_process_group()
            raise EngineBrokenError(self.broken) from error


class TensorParallelEngine(LLMEngine):
    """The engine on rank 0 of the default process group, the other ranks in `follow` with the same model,
    split and config. `close` (or a failed start) lets them go."""

    runner_class = BroadcastingRunner

    def __init__(self, model, tokenizer, split: HeadSplit, config: EngineConfig, model_name: str = "model",
                 sharding: Sharding = balanced_plan):
        self.shard = prepare_rank(model, split, config, sharding)
        try:
            super().__init__(model, tokenizer, self.shard.split, self.shard.config, model_name)
        except BaseException:
            _broadcast(None)
            raise
        self._following = True

    def _allocate_cache(self, split: HeadSplit, head_dim: int) -> HeadSplitCache:
        cache = self.shard.cache(head_dim, _SlotLog)
        cache.recompute = recompute_span(self.shard.plan.split, self.shard.cache_config)  # every rank's heads
        return cache

    def _calibrate_kv_scales(self) -> None:
        """Every rank measures its own heads' scales on the same prompt (its steps reach them as any other)."""
        super()._calibrate_kv_scales()
        if self.cache.quantized:
            _broadcast(CALIBRATED)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._following and not self.runner.broken:
                self._following = False
                _broadcast(None)


def follow(model, split: HeadSplit, config: EngineConfig, sharding: Sharding = balanced_plan) -> Shard:
    """A rank other than 0: shard the model, then run every step rank 0 sends until it says stop; the
    rank's share, for its caller to report on."""
    shard = prepare_rank(model, split, config, sharding)
    config, head_dim = shard.config, head_dim_of(model.config)
    max_len = config.max_model_len or model.config.max_position_embeddings
    cache = shard.cache(head_dim)
    cache.start_calibration()  # (an fp8 cache's) until rank 0 says CALIBRATED: its first request is the prompt
    integration = ModelIntegration(model, shard.split, Kernels(
        config.device, config.dtype, head_dim, config.sink, config.window, config.max_num_batched_tokens, max_len))
    try:
        tables = BlockManager(cache).block_tables  # rank 0's pages of each slot, as each step brings them
        runner = ModelRunner(model, cache, tables, max_len, cuda_graphs=False)
        while (step := _broadcast(None)) is not None:
            if step == CALIBRATED:
                cache.finish_calibration()
                continue
            step.apply_slot_ops(cache)
            for chunk in step.chunks:
                tables[chunk.slot, :len(chunk.pages)] = torch.tensor(chunk.pages, dtype=tables.dtype)
            runner.run([Chunk(_Replica(chunk), len(chunk.token_ids), chunk.samples, chunk.reuses)
                        for chunk in step.chunks])
    finally:
        integration.undo()
    return shard


# --- serving: rank 0 in this process, the others spawned ---------------------------------------------------

# A follower waits in a collective for rank 0's next step for as long as the server idles: the group's
# timeout (after which gloo fails the wait and NCCL's watchdog aborts the process) must outlast any idle spell.
SERVE_GROUP_TIMEOUT = timedelta(days=365)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world_size: int, port: int, config: EngineConfig,
               timeout: timedelta = SERVE_GROUP_TIMEOUT) -> EngineConfig:
    """Join the default process group on 127.0.0.1 as `rank`: NCCL with GPU `rank` for a CUDA config, gloo on
    the CPU; the config this rank serves with (its own GPU)."""
    cuda = config.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
        config = replace(config, device=f"cuda:{rank}")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timeout)
    return config


def _serve_follower(index: int, world_size: int, port: int, model_spec: str, profile, config: EngineConfig,
                    trust_remote_code: bool) -> None:
    config = join_group(index + 1, world_size, port, config)
    try:
        model, _, split, config, _ = load_served(model_spec, profile, config, trust_remote_code)
        follow(model, split, config)
    finally:
        dist.destroy_process_group()  # (rank 0 may have left already: this rank's own handle is still there)


def start_serving(world_size: int, model_spec: str, profile, config: EngineConfig,
                  trust_remote_code: bool = False) -> tuple[TensorParallelEngine, mp.ProcessContext]:
    """Ranks 1.. in spawned processes (daemons: they die with this one), each loading the model and choosing
    its split as `LLMEngine.from_model` does; rank 0's engine here. The caller closes the engine, then
    joins the processes and destroys the group (`stop_serving`)."""
    port = free_port()
    followers = mp.start_processes(_serve_follower, args=(world_size, port, model_spec, profile, config,
                                                          trust_remote_code),
                                   nprocs=world_size - 1, join=False, daemon=True, start_method="spawn")
    config = join_group(0, world_size, port, config)
    return TensorParallelEngine.from_model(model_spec, profile, config, trust_remote_code), followers


def stop_serving(engine: TensorParallelEngine, followers: mp.ProcessContext, timeout: float = 60.0) -> None:
    """Close rank 0's engine (which lets the followers go), wait for them, and leave the group (unless a
    broken engine left it already, its followers failing as it went)."""
    try:
        engine.close()
        try:
            followers.join(timeout)
        except mp.ProcessRaisedException:
            if not engine.runner.broken:
                raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
