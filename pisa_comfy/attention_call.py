"""One call of ComfyUI's attention function, as the override receives it.

ComfyUI's backends share the signature ``fn(q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)``; models pass ``heads`` positionally
(FLUX, HunyuanVideo) or as a keyword (Wan), and q/k/v either as ``(B, N, H*D)`` or, with
``skip_reshape=True``, as ``(B, H, N, D)``.  This module reads such a call without copying
anything, hands the dense path the call exactly as it came, and shapes the PISA output the way
the caller asked for it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


def _backend_signature(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):
    """Never called: its signature is the one ComfyUI's attention backends share."""


_SIGNATURE = inspect.signature(_backend_signature)

#: Keyword arguments the override understands (or may safely ignore) and forwards to the dense path.
#: ``low_precision_attention`` only asks backends not to quantise, which PISA never does.
KNOWN_KWARGS = frozenset({"transformer_options", "_inside_attn_wrapper", "low_precision_attention",
                          "scale", "enable_gqa"})


def _tensor(x):
    """Late-2026 cores may hand q/k/v over in single-owner containers (``.take()``)."""
    if not isinstance(x, torch.Tensor) and callable(getattr(x, "take", None)):
        return x.take()
    return x


@dataclass
class AttentionCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: object
    skip_reshape: bool
    skip_output_reshape: bool
    extra: dict  # keyword arguments beyond the named ones (transformer_options, scale, ...)
    args: tuple  # the call as received (containers replaced by their tensors), for the dense path
    kwargs: dict

    @classmethod
    def parse(cls, args: tuple, kwargs: dict) -> "AttentionCall":
        args = tuple(_tensor(a) for a in args[:3]) + tuple(args[3:])
        kwargs = {name: _tensor(value) if name in ("q", "k", "v") else value for name, value in kwargs.items()}
        bound = _SIGNATURE.bind(*args, **kwargs).arguments
        return cls(q=bound["q"], k=bound["k"], v=bound["v"], heads=int(bound["heads"]),
                   mask=bound.get("mask"), skip_reshape=bool(bound.get("skip_reshape", False)),
                   skip_output_reshape=bool(bound.get("skip_output_reshape", False)),
                   extra=bound.get("kwargs", {}), args=args, kwargs=kwargs)

    @property
    def transformer_options(self) -> dict:
        return self.extra.get("transformer_options") or {}

    @property
    def layout(self) -> str:
        """The kernel layout of :meth:`kernel_inputs`: ``BHND`` as given, or ``BNHD`` views of ``(B, N, H*D)``."""
        return "BHND" if self.skip_reshape else "BNHD"

    def dims(self, t: torch.Tensor) -> tuple[int, int, int, int]:
        """``(B, H, N, D)`` of one of q, k, v."""
        if self.skip_reshape:
            b, h, n, d = t.shape
            return b, h, n, d
        b, n, hd = t.shape
        return b, self.heads, n, hd // self.heads

    def kernel_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as 4-D views in :attr:`layout` (no copies)."""
        if self.skip_reshape:
            return self.q, self.k, self.v
        b, h, n, d = self.dims(self.q)
        return tuple(t.view(b, n, h, d) for t in (self.q, self.k, self.v))

    def shape_output(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel output (in :attr:`layout`) in the shape the caller expects back."""
        bhnd = out if self.layout == "BHND" else out.transpose(1, 2)
        if self.skip_output_reshape:
            return bhnd
        b, h, n, d = bhnd.shape
        return bhnd.transpose(1, 2).reshape(b, n, h * d)
