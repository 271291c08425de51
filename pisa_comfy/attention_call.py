"""One call of ComfyUI's attention function, as the override receives it.

ComfyUI's backends share the signature ``fn(q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)``; models pass ``heads`` positionally
(FLUX, HunyuanVideo) or as a keyword (Wan), and q/k/v either as ``(B, N, H*D)`` or, with
``skip_reshape=True``, as ``(B, H, N, D)``.  This module reads such a call without copying
anything, hands the dense path the call exactly as it came, and shapes the PISA output the way
the caller asked for it.

Every attention call of a patched model passes through :meth:`AttentionCall.parse`, the dense
ones too, so it binds the arguments by hand (``inspect.Signature.bind`` costs several
microseconds a call) and reads the dimensions once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The named parameters of ComfyUI's attention backends, in their positional order.
_PARAMETERS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_REQUIRED = frozenset(_PARAMETERS[:4])

#: Keyword arguments the override understands (or may safely ignore) and forwards to the dense path.
#: ``low_precision_attention`` only asks backends not to quantise, which PISA never does.
KNOWN_KWARGS = frozenset({"transformer_options", "_inside_attn_wrapper", "low_precision_attention",
                          "scale", "enable_gqa"})


def _tensor(x):
    """Late-2026 cores may hand q/k/v over in single-owner containers (``.take()``)."""
    if not isinstance(x, torch.Tensor) and callable(getattr(x, "take", None)):
        return x.take()
    return x


def _bind(args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """``(named arguments, extra keyword arguments)``, with the errors Python's own binding raises."""
    if len(args) > len(_PARAMETERS):
        raise TypeError(f"attention takes at most {len(_PARAMETERS)} positional arguments ({len(args)} given)")
    named = dict(zip(_PARAMETERS, args))
    extra = {}
    for name, value in kwargs.items():
        if name in named:
            raise TypeError(f"attention got multiple values for argument {name!r}")
        if name in _PARAMETERS:
            named[name] = value
        else:
            extra[name] = value
    if not _REQUIRED <= named.keys():
        missing = sorted(_REQUIRED - named.keys(), key=_PARAMETERS.index)
        raise TypeError(f"attention is missing required argument(s) {', '.join(missing)}")
    return named, extra


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
    # (B, H, N, D) of q, and the key count of k: read once here, used by every later decision.
    b: int
    h: int
    n: int
    d: int
    n_k: int

    @classmethod
    def parse(cls, args: tuple, kwargs: dict) -> "AttentionCall":
        args = tuple(_tensor(a) for a in args[:3]) + tuple(args[3:])
        if "q" in kwargs or "k" in kwargs or "v" in kwargs:
            kwargs = {name: _tensor(value) if name in ("q", "k", "v") else value for name, value in kwargs.items()}
        named, extra = _bind(args, kwargs)
        q, k = named["q"], named["k"]
        heads = int(named["heads"])
        skip_reshape = bool(named.get("skip_reshape", False))
        if skip_reshape:
            b, h, n, d = q.shape
            n_k = k.shape[2]
        else:
            b, n, hd = q.shape
            h, d, n_k = heads, hd // heads, k.shape[1]
        return cls(q=q, k=k, v=named["v"], heads=heads, mask=named.get("mask"), skip_reshape=skip_reshape,
                   skip_output_reshape=bool(named.get("skip_output_reshape", False)), extra=extra, args=args,
                   kwargs=kwargs, b=b, h=h, n=n, d=d, n_k=n_k)

    @classmethod
    def from_bnhd(cls, q, k, v, extra: dict) -> AttentionCall:
        """A call whose q/k/v already are ``(B, N, H, D)`` tensors: what raylight's inner attention
        hands over after the Ulysses all-to-all (every token, this rank's heads).  Its
        :attr:`layout` is ``BNHD`` and the kernel output is already the shape that caller wants;
        it has no dense path of its own (:meth:`dense` is the ComfyUI backend call's, not this
        one's), the caller brings its own."""
        b, n, h, d = q.shape
        return cls(q=q, k=k, v=v, heads=h, mask=None, skip_reshape=False, skip_output_reshape=False, extra=extra,
                   args=(), kwargs={}, b=b, h=h, n=n, d=d, n_k=k.shape[1])

    @property
    def transformer_options(self) -> dict:
        return self.extra.get("transformer_options") or {}

    @property
    def layout(self) -> str:
        """The kernel layout of :meth:`kernel_inputs`: ``BHND`` as given, or ``BNHD`` views of ``(B, N, H*D)``."""
        return "BHND" if self.skip_reshape else "BNHD"

    @property
    def work(self) -> float:
        """Attention work of the call, ``B * H * Nq * Nk`` (what the run's effective density weighs)."""
        return float(self.b * self.h * self.n * self.n_k)

    def kernel_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as 4-D views in :attr:`layout` (no copies)."""
        if self.skip_reshape:
            return self.q, self.k, self.v
        return tuple(t.view(self.b, self.n, self.h, self.d) for t in (self.q, self.k, self.v))

    def dense(self, func, previous):
        """The call exactly as it came, on the dense path: ``previous`` override, else ComfyUI's ``func``."""
        return previous(func, *self.args, **self.kwargs) if previous is not None else func(*self.args, **self.kwargs)

    def shape_output(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel output (in :attr:`layout`) in the shape the caller expects back."""
        bhnd = out if self.layout == "BHND" else out.transpose(1, 2)
        if self.skip_output_reshape:
            return bhnd
        b, h, n, d = bhnd.shape
        return bhnd.transpose(1, 2).reshape(b, n, h * d)
