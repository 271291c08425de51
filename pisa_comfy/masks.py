"""Attention masks PISA can honour itself: key-padding masks.

HunyuanVideo masks its padded text with an additive ``(1, 1, N)`` float mask (0 for valid keys,
``-finfo.max`` for padding) in every joint block.  Running those calls dense (what core's sparse
node does) would leave HunyuanVideo without any speed-up, so a mask that only says "these keys do
not exist" becomes PISA's ``kv_valid`` (invalid keys get exactly zero weight).  Any other mask
(per-query masks such as the token refiner's ``(B, 1, L, L)``, or soft biases) stays dense.
"""

from __future__ import annotations

import torch

#: An additive mask value at or below this removes the key (softmax weight below e^-10000).
_REMOVED = -1.0e4


def key_padding_valid(mask, batch: int, n: int) -> torch.Tensor | None:
    """bool ``[B, N]`` (True = valid key) if ``mask`` only removes keys, else ``None``.

    ComfyUI reads masks as ``(queries, keys)``, ``(batch, queries, keys)`` or ``(batch, heads,
    queries, keys)``; a key-padding mask has size 1 in every dimension but batch and keys.  Looking
    at the values synchronises with the device, so callers cache the answer per mask tensor.
    """
    if not isinstance(mask, torch.Tensor) or not 2 <= mask.dim() <= 4 or mask.shape[-1] != n:
        return None
    rows = 1 if mask.dim() == 2 else mask.shape[0]
    per_query = mask.shape[:-1] if mask.dim() == 2 else mask.shape[1:-1]  # heads / queries: must be 1
    if any(s != 1 for s in per_query) or rows not in (1, batch):
        return None
    flat = mask.reshape(rows, n)
    if flat.dtype == torch.bool:
        valid = flat
    elif flat.is_floating_point():
        valid = flat == 0
        if not bool((valid | (flat <= _REMOVED)).all()):
            return None  # a soft bias, not padding
    else:
        return None
    return valid.expand(batch, n)
