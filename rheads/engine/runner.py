"""One forward pass over a packed batch of chunks, through the model's own transformers modules."""

from __future__ import annotations

import torch

from .attention import BatchMeta, SeqSlice
from .cache import HeadSplitCache
from .scheduler import Chunk


class ModelRunner:
    def __init__(self, model, cache: HeadSplitCache):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Feed every chunk; return logits [sampling chunks, vocab] for chunks that end a sequence."""
        ids, positions, slices, last = [], [], [], []
        for chunk in chunks:
            seq, begin = chunk.seq, len(ids)
            start = seq.num_cached
            ids.extend(seq.all_ids[start:start + chunk.num_tokens])
            positions.extend(range(start, start + chunk.num_tokens))
            table = torch.tensor(seq.pages, dtype=torch.long, device=self.device)
            slices.append(SeqSlice(begin, len(ids), start, seq.slot, table))
            if chunk.samples:
                last.append(len(ids) - 1)
        device = self.device
        position_ids = torch.tensor(positions, device=device)
        meta = BatchMeta(self.cache, slices, position_ids)
        hidden = self.model.model(
            input_ids=torch.tensor(ids, device=device)[None], position_ids=position_ids[None],
            use_cache=False, rheads_batch=meta,
        ).last_hidden_state[0]
        for chunk in chunks:
            chunk.seq.num_cached += chunk.num_tokens
        return self.model.lm_head(hidden[torch.tensor(last, device=device)]) if last else hidden[:0]
