"""How much of a GPU an lmdeploy engine's KV cache may take.

lmdeploy sizes the cache as a fraction (`cache_max_entry_count`, 0.8) of the memory left after the
weights, whatever the model. For a small LLM that is far more than the engine can ever use: at most
`max_batch_size` sequences of at most `session_len` tokens are cached at once. The shipped demo model
(3 layers, 768 bytes a token) would get over 2 M blocks (about 110 GB) on an H200. Capping the fraction at what
can be used keeps the rest of the GPU for the engines that share it (fractional `--gpus-per-replica`) and
keeps cache allocation short; models whose full cache does not fit are unaffected.
"""
from __future__ import annotations

DEFAULT_CACHE_FRACTION = 0.8
# lmdeploy applies the fraction to memory measured after the weights and its activation reserve, which is
# less than what we measure before building; the headroom keeps the capped cache at or above the need.
CAP_HEADROOM = 1.25


def kv_cache_bytes_needed(kv_bytes_per_token: int, *, max_batch_size: int, session_len: int) -> int:
    """The most KV cache an engine can fill: every batch slot holding a full-length session."""
    return kv_bytes_per_token * max_batch_size * session_len


def capped_cache_fraction(
    kv_bytes_per_token: int | None,
    *,
    max_batch_size: int,
    session_len: int | None,
    free_bytes: int,
    fraction: float = DEFAULT_CACHE_FRACTION,
) -> float:
    """`fraction`, lowered to what the engine can use (with headroom) when that is less.

    Returns `fraction` unchanged when the model's cache shape or context length is unknown."""
    if not kv_bytes_per_token or not session_len or free_bytes <= 0:
        return fraction
    needed = kv_cache_bytes_needed(kv_bytes_per_token, max_batch_size=max_batch_size, session_len=session_len)
    return min(fraction, CAP_HEADROOM * needed / free_bytes)
