"""Host-to-device copies that do not wait for the GPU.

A copy from pageable host memory (what `torch.tensor(values, device="cuda")` and `.to("cuda")` of a
fresh host tensor do) makes the host wait until the GPU has finished the work queued before it: it
would stall a pipelined decode step, whose next launch is queued while the current one runs. A copy
from pinned memory is queued like a kernel.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a host tensor, or a list for torch.tensor) on `device`, queued without waiting on CUDA."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
