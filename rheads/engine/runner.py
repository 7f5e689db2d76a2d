"""One forward pass over a packed batch of chunks, through the model's own transformers modules."""

from __future__ import annotations

import torch

from .attention import BatchMeta, DecodeBatch, SeqSlice
from .cache import HeadSplitCache
from .scheduler import Chunk


class ModelRunner:
    def __init__(self, model, cache: HeadSplitCache):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Feed every chunk; return logits [sampling chunks, vocab] for chunks that end a sequence."""
        ids, positions, slices, last, decoding = [], [], [], [], []
        for chunk in chunks:
            seq, begin = chunk.seq, len(ids)
            start = seq.num_cached
            ids.extend(seq.all_ids[start:start + chunk.num_tokens])
            positions.extend(range(start, start + chunk.num_tokens))
            if chunk.num_tokens == 1:
                decoding.append((begin, chunk))
            else:
                table = torch.tensor(seq.pages, dtype=torch.long, device=self.device)
                slices.append(SeqSlice(begin, len(ids), start, seq.slot, table))
            if chunk.samples:
                last.append(len(ids) - 1)
        device = self.device
        position_ids = torch.tensor(positions, device=device)
        meta = BatchMeta(self.cache, slices, position_ids, self._decode_batch(decoding))
        hidden = self.model.model(
            input_ids=torch.tensor(ids, device=device)[None], position_ids=position_ids[None],
            use_cache=False, rheads_batch=meta,
        ).last_hidden_state[0]
        for chunk in chunks:
            chunk.seq.num_cached += chunk.num_tokens
        return self.model.lm_head(hidden[torch.tensor(last, device=device)]) if last else hidden[:0]

    def _decode_batch(self, decoding: list) -> DecodeBatch | None:
        """Device tensors for the single-token sequences, built once and shared by every layer."""
        if not decoding:
            return None
        cache, page = self.cache, self.cache.config.page_size
        positions = [chunk.seq.num_cached for _, chunk in decoding]
        widest = max(len(chunk.seq.pages) for _, chunk in decoding)
        table = [chunk.seq.pages + [0] * (widest - len(chunk.seq.pages)) for _, chunk in decoding]
        pos = torch.tensor(positions)

        def dev(values, dtype=torch.long) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return DecodeBatch(
            rows=dev([begin for begin, _ in decoding]),
            page_table=dev(table, torch.int32).reshape(len(decoding), widest),
            page_ids=dev([row[p // page] if row else 0 for row, p in zip(table, positions)]),
            page_offsets=dev(pos % page),
            lengths=dev(pos + 1, torch.int32),
            slots=dev([chunk.seq.slot for _, chunk in decoding]),
            ring_offsets=dev(cache.ring_index(pos)),
            ring_lengths=dev(torch.clamp(pos + 1, max=cache.window_slots), torch.int32),
            max_length=max(positions) + 1,
        )
