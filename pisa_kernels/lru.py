"""Bounded caches that drop their least recently used entry when full.

The API's plans and checked token orders and the CUDA graphs of short calls are cached per setting;
clearing a full cache at once (as they did first) drops the entries in use with the stale ones, and a
dropped plan or graph is a graph captured again at its next call.  A plain dict keeps insertion
order, so moving a hit to the end and popping the first entry is the whole policy.
"""

from __future__ import annotations


def lookup(cache: dict, key):
    """``cache[key]`` (None where absent), marked as the most recently used entry."""
    hit = cache.pop(key, None)
    if hit is not None:
        cache[key] = hit
    return hit


def make_room(cache: dict, size: int) -> None:
    """Drop the least recently used entries until one more fits in ``size`` (before building an entry
    that holds memory, so that the dropped ones are freed first)."""
    while len(cache) >= size:
        cache.pop(next(iter(cache)), None)


def remember(cache: dict, key, value, size: int) -> None:
    """Store ``value`` under ``key``, first dropping the least recently used entries of a full cache."""
    make_room(cache, size)
    cache[key] = value
