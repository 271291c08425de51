"""The attention override closure and how to recognise it inside a chain of overrides.

ComfyUI calls ``transformer_options["optimized_attention_override"](func, *args, **kwargs)``
instead of its attention backend.  Overrides compose by chaining: each keeps the one it replaced
and calls it as its own fallback.  PISA's closures carry two tags, ``pisa_state`` (which PISA
Patch node made it) and ``pisa_previous`` (what it wrapped), so re-installing can check the whole
chain (also through other packs' closures, by looking at the callables they close over) and never
wraps the same chain twice.
"""

from __future__ import annotations

import functools

import torch

OVERRIDE_KEY = "optimized_attention_override"

#: Callables looked at when searching a chain; chains are short, this only bounds odd cycles.
_CHAIN_SEARCH_LIMIT = 64


def compiler_disabled(fn):
    """Keep ``torch.compile`` (TorchCompileModel) out of ``fn``: one predictable graph break per
    call, instead of dynamo tracing the bookkeeping (locks, per-forward counters that would make it
    recompile for every block) and the kernel call."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def make_override(state, previous, body):
    """The override of ``state``'s node; ``previous`` (or ComfyUI's ``func``) is its dense path.
    ``body(state, func, previous, args, kwargs)`` handles each call (PISA's :func:`dispatch`, or
    another node kind's, e.g. the capture's)."""

    @compiler_disabled
    def pisa_attention_override(func, *args, **kwargs):
        return body(state, func, previous, args, kwargs)

    pisa_attention_override.pisa_state = state
    pisa_attention_override.pisa_previous = previous
    return pisa_attention_override


def _callables_inside(fn):
    """What a callable may delegate to: our tag, ``__wrapped__``, a partial's function, closure cells."""
    yield getattr(fn, "pisa_previous", None)
    yield getattr(fn, "__wrapped__", None)
    if isinstance(fn, functools.partial):
        yield fn.func
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if callable(value):
            yield value


def chain_contains(fn, state) -> bool:
    """Whether ``state``'s override is anywhere in the chain that starts at ``fn``."""
    seen: set[int] = set()
    todo = [fn]
    while todo and len(seen) < _CHAIN_SEARCH_LIMIT:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, "pisa_state", None) is state:
            return True
        todo.extend(_callables_inside(current))
    return False


def describe_override(fn) -> str:
    """Where an override comes from, for log lines."""
    if fn is None:
        return "ComfyUI's default attention"
    name = getattr(fn, "__qualname__", type(fn).__name__)
    return f"{getattr(fn, '__module__', None) or '?'}.{name}"
