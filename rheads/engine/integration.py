"""What the engine changes in a model to serve it, installed in one step and undone in one step.

Serving a model under a head split changes it in place: its attention heads are reordered so each
layer's full heads come first (`heads.py`), its attention implementation becomes the head-split one,
and its Llama-style modules get fused forwards (`fused.py`). The kernels the served path will need
are warmed up at the same time (and cuDNN's per thread, by `prepare_thread`), so no request waits for a
compile. `undo` gives the model back as it
was (heads in their original order, its own attention and forwards), so one loaded model can serve
several splits in turn (the evaluations do) or go back to transformers' `generate`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from . import band
from .cudnn_prefill import CudnnPlans
from .attention import register_attention
from .cache import layer_geometry
from .fused import fuse_modules, unfuse_modules
from .heads import HeadSplit, permute_attention_heads, restore_attention_heads


@dataclass(frozen=True)
class Kernels:
    """The settings the served kernels are warmed up for."""

    device: str
    dtype: object
    head_dim: int
    sink: int
    window: int
    chunk: int  # prefill chunk size (max_num_batched_tokens): the cuDNN plans are for whole chunks
    max_len: int  # max_model_len


class ModelIntegration:
    """The model's changes for one head split; `undo` is safe to call more than once."""

    def __init__(self, model, split: HeadSplit, kernels: Kernels):
        self.model, self.split = model, split
        self._attn_implementation = model.config._attn_implementation
        self.kernels, self._prepared = kernels, threading.local()
        permute_attention_heads(model, split)
        self.installed = True
        try:
            model.config._attn_implementation = register_attention()
            fuse_modules(model)  # one q/k/v and one gate/up product; on CUDA one kernel per norm, RoPE, SiLU
            if kernels.device.startswith("cuda") and min(split.num_full) < split.num_kv_heads:  # streaming heads
                groups = model.config.num_attention_heads // split.num_kv_heads
                geometries = {layer_geometry(split, layer, kernels) for layer in range(split.num_layers)}
                for scaling in {m.scaling for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")}:
                    for sink, window in geometries:  # a sliding layer's: the model's window, no sink
                        band.warm_up(groups, kernels.head_dim, kernels.dtype, kernels.device, sink, window, scaling)
        except BaseException:
            self.undo()
            raise

    def prepare_thread(self, plans: CudnnPlans) -> None:
        """Warm-ups that belong to the thread that steps the engine: PyTorch keeps cuDNN's plans per thread,
        so each stepping thread builds the full heads' prefill plans for itself (seconds at most, once),
        recorded in `plans` (the runner's)."""
        if getattr(self._prepared, "done", False):
            return
        kernels, split = self.kernels, self.split
        if kernels.device.startswith("cuda") and max(split.num_full) > 0:
            groups = self.model.config.num_attention_heads // split.num_kv_heads
            plans.warm_up(kernels.device, kernels.dtype, kernels.head_dim, groups, set(split.num_full) - {0},
                          min(kernels.chunk, kernels.max_len), kernels.max_len)
        self._prepared.done = True

    def undo(self) -> None:
        if self.installed:
            unfuse_modules(self.model)
            self.model.config._attn_implementation = self._attn_implementation
            restore_attention_heads(self.model, self.split)
            self.installed = False
