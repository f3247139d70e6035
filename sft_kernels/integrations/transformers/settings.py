"""What the backend's modules share: its name, the supported transformers version, and the
settings :func:`~sft_kernels.integrations.transformers.register` stores (one dict, changed in
place)."""

from __future__ import annotations

import importlib

ATTN_IMPLEMENTATION = "sft_sliding_window"
MIN_TRANSFORMERS_VERSION = "5.0.0"
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Set by register(): the window for models that have none of their own, and the backend.
# "auto" is resolved here, once, rather than inside every (possibly compiled) call.
_settings = {"window_size": None, "backend": "auto", "cuda_backend": "torch", "collector": None,
             "cache_kwargs_dict": False, "context_parallel_group": None}

# Sequences per row in the segment table: left-pad queries, left-pad keys, real, right-pad
# queries, right-pad keys.
_SEGMENTS = 5


# ----------------------------------------------------------------------------- version
def _version_tuple(v: str):
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _transformers():
    """Import transformers and check the version; a clear error when missing or too old."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(
            f"sft_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION}: "
            f"pip install 'transformers>={MIN_TRANSFORMERS_VERSION}' ({exc})"
        ) from exc
    if _version_tuple(transformers.__version__) < _version_tuple(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"sft_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION} (its attention "
            f"and mask interfaces and cache layers), found {transformers.__version__}; upgrade with "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )
    return transformers


