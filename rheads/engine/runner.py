"""One forward pass over a packed batch of chunks, through the model's own transformers modules.

On CUDA, a step in which every sequence decodes one token replays a CUDA graph captured for the next
batch-size bucket (padding rows write to the cache's scratch page and slot): the whole step, 32 layers
of small kernels, becomes one launch, its inputs one copy from pinned memory. The engine captures every
bucket it can use at start-up. Steps with prefill chunks run eagerly.
"""

from __future__ import annotations

import logging

import torch

from .attention import CURRENT_BATCH, BatchMeta, SeqSlice
from .cache import HeadSplitCache, ring_index
from .cudnn_prefill import CudnnPlans
from .decode import DecodeBatch
from .grammar import mask_rows, row_matchers
from .logits import model_logits
from .messages import Chunk, PendingOutput, RunnerOutput, SchedulerOutput
from .sampler import adjust_logits, draw_tokens, is_plain, sample_batch
from .sequence import Sequence
from .transfer import to_device

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class ModelRunner:
    """Builds a step's tensors from the sequences, runs the forward and samples. It owns what one forward
    hands its layers beside the model's own arguments (`BatchMeta`): the cache, the batch's layout, the
    residual stream between fused layers and the record of the cuDNN plans built for the prefill."""

    def __init__(self, model, cache: HeadSplitCache, block_tables: torch.Tensor, max_model_len: int,
                 cuda_graphs: bool = True, eos_ids: set[int] | None = None):
        self.model, self.cache, self.max_model_len = model, cache, max_model_len
        self.eos_ids = eos_ids or set()  # what min_tokens holds back
        self.block_tables = block_tables  # the block manager's, read here, never written
        self.device = next(model.parameters()).device
        self.max_pages = min(cache.pages_for(max_model_len), block_tables.shape[1])  # a graph's table width
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, _DecodeGraph] = {}
        self.graph_pool = None
        self.plans = CudnnPlans()  # filled per stepping thread by the model integration's `prepare_thread`

    def execute(self, output: SchedulerOutput, defer: bool = False) -> RunnerOutput | PendingOutput:
        """Run `output`'s forward and sample the rows that sample (`forward`, then `sample`)."""
        return self.sample(output, self.forward(output), defer)

    def forward(self, output: SchedulerOutput, previous: PendingOutput | None = None) -> torch.Tensor:
        """Launch `output`'s forward: the logits [sampling chunks, vocab] of the chunks that sample. A
        pipelined step (`output.fed_rows`) feeds the tokens of `previous`, still on the device."""
        tokens = None
        if output.fed_rows is not None:
            tokens = previous.tokens
            if len(output.fed_rows) < len(previous.seqs):  # the rows of the sequences that go on
                tokens = tokens[to_device(output.fed_rows, tokens.device)]
        try:
            return self.run(output.chunks, tokens)
        except Exception as error:
            log.error("a forward pass failed (%s: %s); requests %s", type(error).__name__, error,
                      ", ".join(c.seq.request_id for c in output.chunks))
            raise

    def sample(self, output: SchedulerOutput, logits: torch.Tensor, defer: bool = False
               ) -> RunnerOutput | PendingOutput:
        """The next token of each row of `forward`'s logits, as its sequence stands now (a grammar row's
        matcher has taken every token appended before). With `defer`, a decode step whose rows the device
        draws alone (`is_plain`, no adjustment but a grammar's mask) leaves its tokens there
        (PendingOutput); otherwise, or if that draw fails, they are sampled on the host."""
        seqs = output.sampling
        # a deferred step's tokens stay on the device, so no row of it may need its tokens so far on the host
        if defer and output.decode_only and all(is_plain(s.params, s.generator) and not s.params.penalized
                                                for s in seqs):
            try:
                masked = mask_rows(logits, row_matchers(seqs))
                return PendingOutput(seqs, draw_tokens(masked, [s.params for s in seqs]))
            except Exception as error:  # noqa: BLE001 - sampled on the host below
                log.warning("drawing tokens on the device failed (%s); sampling on the host", error)
        return sample_on_host(logits, seqs, self.eos_ids)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], input_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feed every chunk; return logits [sampling chunks, vocab] for the chunks that sample. It reads the
        sequences and never changes them: the scheduler advances what is cached (`Scheduler.update`).

        `input_tokens` (on the device, one per chunk) feeds a pipelined decode step: tokens sampled by
        the step before, which the host has not read yet.
        """
        if self.use_graphs and all(c.decodes for c in chunks):
            size = next((s for s in GRAPH_BATCH_SIZES if s >= len(chunks)), None)
            if size is not None:  # padding rows use the scratch page and slot, not real ones
                return self._replay(chunks, size, input_tokens)
        ids, positions, slices, last, decoding = [], [], [], [], []
        for chunk in chunks:
            seq, begin = chunk.seq, len(positions)
            start = seq.num_cached
            if input_tokens is None:
                ids.extend(seq.token_ids(start, start + chunk.num_tokens))
            positions.extend(range(start, start + chunk.num_tokens))
            if chunk.decodes:
                decoding.append((begin, chunk))
            else:
                table = to_device(seq.pages, self.device, torch.long)
                slices.append(SeqSlice(begin, len(positions), start, seq.slot, table, chunk.reuses))
            if chunk.samples:
                last.append(len(positions) - 1)
        device = self.device
        position_ids = to_device(positions, device)
        decode = self.decode_batch(decoding).to(device) if decoding else None
        meta = BatchMeta(self.cache, slices, position_ids, decode, self.plans)
        hidden = forward_model(self.model, meta, (to_device(ids, device) if input_tokens is None else input_tokens)[None],
                               position_ids[None])
        return model_logits(self.model, hidden[to_device(last, device)]) if last else hidden[:0]

    def decode_batch(self, decoding: list[tuple[int, Chunk]], size: int | None = None,
                     width: int | None = None) -> DecodeBatch:
        """Host tensors for the single-token sequences (rows beyond them, up to `size`, are padding)."""
        cache, page = self.cache, self.cache.config.page_size
        size = size or len(decoding)
        positions = [chunk.seq.num_cached for _, chunk in decoding] + [0] * (size - len(decoding))
        width = width or max((len(chunk.seq.pages) for _, chunk in decoding), default=0) or 1
        slots = torch.tensor([chunk.seq.slot for _, chunk in decoding] + [cache.scratch_slot] * (size - len(decoding)))
        table = self.block_tables[slots, :width]  # rows past a sequence's pages are never read
        pos = torch.tensor(positions)
        return DecodeBatch(
            rows=torch.tensor([begin for begin, _ in decoding] + list(range(len(decoding), size))),
            page_table=table,
            page_ids=table.gather(1, (pos // page).clamp(max=width - 1)[:, None])[:, 0].long(),
            page_offsets=pos % page,
            lengths=(pos + 1).to(torch.int32),
            slots=slots,
            ring_offsets=torch.stack([ring_index(pos, sink, window) for sink, window in cache.geometries]),
            ring_lengths=torch.stack([torch.clamp(pos + 1, max=sink + window) for sink, window in cache.geometries]
                                     ).to(torch.int32),
            max_length=max(positions) + 1,
        )

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int) -> None:
        """Capture every batch-size bucket a batch of up to `max_batch` sequences can use, now (at start-up,
        as vLLM does), so no request waits for a capture or a kernel compile mid-stream. Largest first:
        the smaller graphs then reuse the shared pool's memory."""
        if not self.use_graphs:
            return
        sizes = [s for s in GRAPH_BATCH_SIZES if s < max_batch]
        sizes += [s for s in GRAPH_BATCH_SIZES if s >= max_batch][:1]
        try:
            for size in reversed(sizes):
                self._graph(size)
        except RuntimeError as error:  # an op capture refuses: a host sync or a pageable copy in the model's code
            self.graphs.clear()
            self.graph_pool, self.use_graphs = None, False
            log.warning("CUDA graphs off, decode steps run eagerly: this model's decode step cannot be captured "
                        "in %s (%s)", self.cache.config.dtype, str(error).splitlines()[0])

    def _graph(self, size: int) -> "_DecodeGraph":
        graph = self.graphs.get(size)
        if graph is None:
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()
            graph = self.graphs[size] = _DecodeGraph(self, size)
        return graph

    def _replay(self, chunks: list[Chunk], size: int, input_tokens: torch.Tensor | None) -> torch.Tensor:
        graph = self._graph(size)
        decoding = [(i, chunk) for i, chunk in enumerate(chunks)]
        if input_tokens is None:
            input_tokens = torch.tensor([c.seq.token_ids(c.seq.num_cached, c.seq.num_cached + 1)[0] for c in chunks])
        graph.replay(self.decode_batch(decoding, size, self.max_pages), input_tokens)
        return graph.logits[:len(chunks)]


def forward_model(model, meta: BatchMeta, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [tokens, hidden] over one packed batch ([1, tokens] ids and positions),
    every attention layer handed `meta` (as a keyword argument, and in `CURRENT_BATCH` for a layer that
    does not pass its keyword arguments on)."""
    token = CURRENT_BATCH.set(meta)
    try:
        return model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                           rheads_batch=meta).last_hidden_state[0]
    finally:
        CURRENT_BATCH.reset(token)


def sample_on_host(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int] = frozenset()) -> RunnerOutput:
    """Each sequence's next token from its row of [rows, vocab] logits, as its request adjusts them
    (`adjust_logits`); a failing row (a bad request's settings) fails alone, with its error."""
    try:
        adjusted = adjust_logits(logits, seqs, eos_ids)
        picks = sample_batch(adjusted, [s.params for s in seqs], [s.generator for s in seqs], logits)
    except Exception as error:  # noqa: BLE001 - one row failed: sample each alone to find it
        log.warning("batched sampling failed (%s); sampling %d rows one by one", error, len(seqs))
        picks = [None] * len(seqs)
    tokens, logprobs, errors = [], [], {}
    for row, (seq, pick) in enumerate(zip(seqs, picks)):
        try:
            one = logits[row:row + 1]
            token, logprob = pick or sample_batch(adjust_logits(one, [seq], eos_ids), [seq.params],
                                                  [seq.generator], one)[0]
        except Exception as error:  # noqa: BLE001 - reported to this request's client
            token, logprob, errors[row] = None, None, f"{type(error).__name__}: {error}"
        tokens.append(token)
        logprobs.append(logprob)
    return RunnerOutput(list(seqs), tokens, logprobs, errors)


class _DecodeGraph:
    """A decode step captured for one batch size: static inputs filled per step, logits read out."""

    def __init__(self, runner: ModelRunner, size: int):
        self.size = size
        device = runner.device
        template = runner.decode_batch([], size, runner.max_pages)
        self.inputs = _PinnedInputs({**template.tensors(), "input_ids": torch.zeros(size, dtype=torch.long),
                                     "positions": torch.zeros(size, dtype=torch.long)}, device)
        views = self.inputs.views
        self.batch = DecodeBatch(**{name: views[name] for name in template.tensors()},
                                 max_length=runner.max_model_len)
        self.input_ids, self.positions = views["input_ids"][None], views["positions"][None]
        meta = BatchMeta(runner.cache, [], self.positions[0], self.batch)

        def forward() -> torch.Tensor:
            return model_logits(runner.model, forward_model(runner.model, meta, self.input_ids, self.positions))

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()  # warm-up: Triton compiles, cuBLAS picks its kernels (writes go to scratch)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.graph_pool):
            self.logits = forward()

    def replay(self, batch: DecodeBatch, token_ids: torch.Tensor) -> None:
        """Run the graph on `batch` (host tensors) fed with `token_ids` (host or device; rows past them keep
        stale ids)."""
        values = {**batch.tensors(), "positions": batch.lengths.long() - 1}
        if token_ids.device.type == "cpu":
            values["input_ids"] = token_ids
        self.inputs.upload(values)
        if token_ids.device.type != "cpu":
            self.input_ids[0, :len(token_ids)].copy_(token_ids)
        self.graph.replay()


class _PinnedInputs:
    """A CUDA graph's static inputs as views of one device buffer, uploaded per step from pinned host
    memory in one asynchronous copy. A copy from pageable memory, one per tensor, makes the host wait
    until the GPU reaches it: the next step could not be launched while one runs.

    Two host buffers take turns; before one is written again, the copy that last read it has finished.
    """

    ALIGN = 16

    def __init__(self, like: dict[str, torch.Tensor], device: torch.device):
        self._places, size = {}, 0
        for name, tensor in like.items():
            self._places[name] = (size, tensor.dtype, tensor.shape)
            size += -(-tensor.numel() * tensor.element_size() // self.ALIGN) * self.ALIGN
        self._device = torch.zeros(size, dtype=torch.uint8, device=device)
        self._hosts = [torch.zeros(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._host_views = [self._views(host) for host in self._hosts]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        self.views = self._views(self._device)
        for name, tensor in like.items():
            self.views[name].copy_(tensor)

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: buffer[start:start + dtype.itemsize * shape.numel()].view(dtype).view(shape)
                for name, (start, dtype, shape) in self._places.items()}

    def upload(self, values: dict[str, torch.Tensor]) -> None:
        """Write these tensors (each at most its input's rows) into the device views, in one copy."""
        host, views, copied = self._hosts[self._turn], self._host_views[self._turn], self._copied[self._turn]
        copied.synchronize()  # at once unless the GPU is two steps behind
        for name, value in values.items():
            views[name][:len(value)].copy_(value)
        self._device.copy_(host, non_blocking=True)
        copied.record()
        self._turn ^= 1
