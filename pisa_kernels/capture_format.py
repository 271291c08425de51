"""The file format of attention captures: q/k/v of one real attention call plus what the node knew.

Written by the PISA Capture node (``pisa_comfy.capture``), read by ``python -m pisa_lab.eval
--capture``.  One call per file, so a long capture never holds more than one call in host memory
and an interrupted run keeps what it wrote.  A safetensors file with:

* tensors ``q``, ``k``, ``v``: ``[B, N, H, D]`` in the dtype the model used (post-RoPE: exactly
  what attention received);
* ``token_perm`` (int64 ``[N]``, optional): the tiled processing order PISA's node would use for
  this call (text first, grids in compact tiles), so the evaluation compares the node's order;
* ``kv_valid`` (bool ``[B, N]``, optional): the key-padding mask (HunyuanVideo's padded text);
* metadata ``format`` = :data:`FORMAT` and ``meta`` = JSON with ``family``, ``model``,
  ``grids`` (``[[first position, [sides]], ...]``), ``exact`` (token ranges kept exact: text and
  other extra tokens), ``text_tokens``, ``text_side``, ``block``, ``step``, ``sigma``, ``heads``,
  ``head_dim``, ``scale``, ``source_layout`` and ``dtype``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

FORMAT = "pisa-capture/1"


@dataclass
class Capture:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    meta: dict
    token_perm: torch.Tensor | None = None
    kv_valid: torch.Tensor | None = None


def write_capture(path: str, cap: Capture) -> None:
    from safetensors.torch import save_file

    tensors = {name: getattr(cap, name).detach().to("cpu").contiguous() for name in ("q", "k", "v")}
    for name in ("token_perm", "kv_valid"):
        value = getattr(cap, name)
        if value is not None:
            tensors[name] = value.detach().to("cpu").contiguous()
    save_file(tensors, path, metadata={"format": FORMAT, "meta": json.dumps(cap.meta)})


def read_capture(path: str, device: torch.device | str = "cpu") -> Capture:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a PISA capture (format {header.get('format')!r}, expected {FORMAT!r})")
        names = set(f.keys())
        tensors = {name: f.get_tensor(name).to(device) for name in names}
    return Capture(q=tensors["q"], k=tensors["k"], v=tensors["v"], meta=json.loads(header["meta"]),
                   token_perm=tensors.get("token_perm"), kv_valid=tensors.get("kv_valid"))
