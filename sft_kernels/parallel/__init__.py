"""Splitting one sequence over ranks.

- :func:`context_parallel_attention`: halo exchange for sliding-window attention; rank r
  holds consecutive tokens and receives only the keys/values its window reaches from its
  neighbours (traffic O(window), independent of the sequence length).
- :func:`context_parallel_groups`: the process groups for context parallelism, optionally
  with DeepSpeed-Ulysses inside each context-parallel shard, and data parallelism across.
- :func:`register_alst` / :func:`alst_parallelism_config` (accelerate): DeepSpeed's ALST
  (``UlyssesSPAttentionHF``) with this package's attention as its core, padding masks passed
  through (:mod:`.alst`).
- :func:`context_parallel_packed_attention`: packed rows across ranks; a sequence crossing a
  shard boundary sends only its own keys, one inside a shard sends nothing (:mod:`.packed`).
- :mod:`.hybrid`: the cheaper exchange per layer of a model (the halo or DeepSpeed's Ulysses, by
  the bytes each would send), which the Hugging Face backend takes under context parallelism.
"""

from .context_parallel import context_parallel_attention  # noqa: F401
from .groups import ParallelGroups, context_parallel_groups  # noqa: F401
from .plan import HaloPlan, halo_plan  # noqa: F401
from .packed import PackedHaloPlan, context_parallel_packed_attention, packed_halo_plan  # noqa: F401
from .alst import alst_parallelism_config, register_alst  # noqa: F401  (DeepSpeed imported when called)

__all__ = ["HaloPlan", "PackedHaloPlan", "ParallelGroups", "alst_parallelism_config", "context_parallel_attention",
           "context_parallel_groups", "context_parallel_packed_attention", "halo_plan", "packed_halo_plan",
           "register_alst"]
