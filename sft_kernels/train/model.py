"""The model for ``sft-kernels train``: the embedded default or a local Hugging Face directory,
its attention implementation and window, and the export to a plain Hugging Face checkpoint.

Embedded default: a small Mistral-architecture model (Mistral is Llama plus
``config.sliding_window``, which is what lets eager and SDPA attention apply the same
window as ``sft_sliding_window``), initialised at random from ``--seed``:
hidden 256, 4 layers, 4 query heads and 2 key/value heads of dim 64, MLP 688, tied
embeddings, vocabulary = the byte tokenizer's 259 ids. 2.97M parameters.

Embeddings of a ``--model_name_or_path`` model with a Hugging Face tokenizer: resized to
``8 * ceil(len(tokenizer) / 8)`` rows, grown or shrunk, as DeepSpeed-Chat's ``create_hf_model``
does (new rows from transformers' mean resizing; under ZeRO-3 transformers 5 creates the resized
embedding whole on every rank, as in DeepSpeed-Chat, and DeepSpeed partitions it at
``initialize``); the tokenizer's pad token is DeepSpeed-Chat's (tokenizer.py). The embedded
model and its exports (byte tokenizer, this package's own) keep their rows.

Window (``--window_size``) per attention implementation:

====================  ====================================  ==============================
``--window_size``      ``sft_sliding_window``                 ``eager`` / ``sdpa``
====================  ====================================  ==============================
``W`` (int >= 1)       ``config.sliding_window = W`` where    ``config.sliding_window = W``
                       the model type has one, else           (Mistral/Qwen2 types only;
                       ``register(window_size=W)``            Llama has no window: error)
``sqrt``               ``register(window_size="sqrt")``,      not expressible: error
                       ``config.sliding_window = None``
``-1``                 no window (causal)                     no window (causal)
not given              the embedded model: 32; a              the same
                       ``--model_name_or_path``: the model's
                       own (``config.sliding_window`` where
                       it has one), else none: a pretrained
                       model keeps the function it learnt
====================  ====================================  ==============================

ZeRO-3: the model is built partitioned (``HfDeepSpeedConfig`` around ``from_pretrained`` /
``from_config``, so ``deepspeed.zero.Init`` partitions each module as it is created); LoRA
(``--lora_dim``, see lora.py) is applied after loading, before DeepSpeed wraps the model.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

WindowOpt = Union[None, int, str]

DEFAULT_MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_dropout=0.0,
)
ATTN_IMPLEMENTATIONS = ("sft_sliding_window", "eager", "sdpa")
_WINDOWED_TYPES = ("mistral", "qwen2", "mixtral", "qwen3")  # configs whose sliding_window eager/SDPA apply


def parse_window_arg(value: str) -> WindowOpt:
    """``--window_size``: an int W >= 1 (W keys including self), ``sqrt``, or -1 / ``none`` for no
    window. What a window may be is :func:`sft_kernels.window.parse_window`'s rule; this adds the
    flag's spelling of "no window" and its message."""
    from ..window import MODE_SQRT, parse_window

    v = str(value).strip().lower()
    if v in ("-1", "none"):
        return None
    try:
        spec = parse_window(v if v == "sqrt" else int(v), causal=True)
    except (TypeError, ValueError):
        raise ValueError(f"--window_size must be an int >= 1, 'sqrt' or -1 (no window), got {value!r}") from None
    return "sqrt" if spec.mode == MODE_SQRT else spec.keys


def default_config(vocab_size: int, window: WindowOpt, pad_id: int, bos_id: int, eos_id: int, **overrides):
    from transformers import MistralConfig

    fields = dict(DEFAULT_MODEL, **overrides)
    return MistralConfig(
        vocab_size=vocab_size,
        sliding_window=window if isinstance(window, int) else None,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        **fields,
    )


def _apply_window(config, window: WindowOpt, attn_implementation: str) -> Optional[WindowOpt]:
    """Put the window into ``config`` where the model type reads one; return what is left for
    ``register``/``patch_model`` (the window of models without their own)."""
    windowed = getattr(config, "model_type", None) in _WINDOWED_TYPES
    if windowed:
        config.sliding_window = window if isinstance(window, int) else None
        if hasattr(config, "use_sliding_window"):
            config.use_sliding_window = isinstance(window, int)
        if hasattr(config, "max_window_layers") and isinstance(window, int):
            config.max_window_layers = 0  # Qwen2: every layer windowed
    if attn_implementation != "sft_sliding_window":
        if window == "sqrt":
            raise ValueError("--window_size sqrt (adaptive window) needs --attn_implementation sft_sliding_window; "
                             "eager/sdpa only take a fixed config.sliding_window")
        if isinstance(window, int) and not windowed:
            raise ValueError(
                f"--window_size {window} with --attn_implementation {attn_implementation}: model type "
                f"{config.model_type!r} has no config.sliding_window, so eager/sdpa would ignore the window; "
                "use --attn_implementation sft_sliding_window or --window_size -1")
        return None
    if windowed and isinstance(window, int):
        return None  # the model's own window is used
    return window


def dschat_vocab_size(n_tokens: int) -> int:
    """DeepSpeed-Chat's embedding size for a tokenizer of ``n_tokens``: ``8 * ceil(n / 8)``."""
    return 8 * math.ceil(n_tokens / 8)


def max_positions(args) -> Optional[int]:
    """The model's ``max_position_embeddings`` (the embedded model's for no
    ``--model_name_or_path``), None where its config has none."""
    if not args.model_name_or_path:
        return DEFAULT_MODEL["max_position_embeddings"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model_name_or_path, local_files_only=True)
    return getattr(config, "max_position_embeddings", None)


def check_max_seq_len(max_seq_len: int, limit: Optional[int], where: str) -> None:
    """ValueError where ``--max_seq_len`` is above the model's ``max_position_embeddings``."""
    if limit is not None and max_seq_len > limit:
        raise ValueError(f"--max_seq_len {max_seq_len} is above the model's max_position_embeddings {limit} "
                         f"({where}): positions past {limit} were never trained (or do not exist); use "
                         f"--max_seq_len {limit} or less")


def dtype_kwargs(dtype: torch.dtype) -> Dict[str, torch.dtype]:
    """``from_pretrained``/``from_config`` dtype keyword: ``dtype`` from transformers 4.56,
    ``torch_dtype`` before (4.48-4.55)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


DEFAULT_WINDOW = 32  # the embedded model's window when --window_size is not given


def window_setting(args) -> Union[WindowOpt, str]:
    """The run's ``--window_size`` setting (not a ``(left, right)`` pair: that is
    :func:`sft_kernels.resolve_window`'s, per sequence length): the flag as parsed, or its default,
    32 for the embedded model, ``"model"`` (keep the model's own window, none when it has none)
    for a ``--model_name_or_path``."""
    if args.window_size is not None:
        return parse_window_arg(args.window_size)
    return "model" if args.model_name_or_path else DEFAULT_WINDOW


def configure_dropout(config, dropout: Optional[float]) -> List[str]:
    """DeepSpeed-Chat's ``--dropout``: set the config fields that exist; returns their names."""
    if dropout is None:
        return []
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {dropout}")
    names = [k for k in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout") if hasattr(config, k)]
    for k in names:
        setattr(config, k, dropout)
    return names


@contextlib.contextmanager
def zero3_partitioned_init(ds_config: Optional[Dict]):
    """While active, ``from_pretrained`` / ``from_config`` build the model under
    ``deepspeed.zero.Init``: each parameter is partitioned across the ranks as soon as its module
    is created, so no rank ever holds the whole model (transformers' ``HfDeepSpeedConfig``,
    what DeepSpeed-Chat's ``create_hf_model`` uses). No-op for ``ds_config=None``."""
    if ds_config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: keep it alive
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()


def build_model(args, tokenizer, ds_config: Optional[Dict] = None, context_parallel_group=None):
    """The ``*ForCausalLM`` (fp32 parameters; DeepSpeed casts for fp16/bf16), with the chosen
    attention implementation and window, dropout, LoRA, gradient checkpointing and ``qkv_groups``.

    ``ds_config`` with ZeRO stage 3: built partitioned (see :func:`zero3_partitioned_init`),
    except with ``--qkv_groups > 1``, whose module swap copies full weights: that model is
    built whole on every rank and partitioned by ``deepspeed.initialize``.
    ``context_parallel_group``: the ``sft_sliding_window`` layers run context-parallel over it
    (``register(context_parallel_group=...)``; each rank then feeds its block of the sequence).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    window = window_setting(args)
    impl = args.attn_implementation
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {impl!r}")
    if args.qkv_groups > 1 and impl != "sft_sliding_window":
        raise ValueError("--qkv_groups > 1 swaps attention for SFTAttention and needs "
                         "--attn_implementation sft_sliding_window")
    if args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path, local_files_only=True)
    else:
        config = default_config(len(tokenizer), window, tokenizer.pad_token_id, tokenizer.bos_token_id,
                                tokenizer.eos_token_id)
    configure_dropout(config, getattr(args, "dropout", None))
    extra_window = None if window == "model" else _apply_window(config, window, impl)
    if impl == "sft_sliding_window":
        from ..integrations.transformers import register

        register(window_size=extra_window, context_parallel_group=context_parallel_group,
                 context_parallel_exchange=getattr(args, "context_parallel_mode", "auto"))
    partitioned = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3 and args.qkv_groups == 1
    torch.manual_seed(args.seed)
    with zero3_partitioned_init(ds_config if partitioned else None):
        if args.model_name_or_path:
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config,
                                                         attn_implementation=impl, local_files_only=True,
                                                         **dtype_kwargs(torch.float32))
        else:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, **dtype_kwargs(torch.float32))
        if getattr(tokenizer, "dschat_padding", False):
            # DeepSpeed-Chat's create_hf_model: always to 8 * ceil(len(tokenizer) / 8), shrinking too
            model.resize_token_embeddings(dschat_vocab_size(len(tokenizer)))
    if args.qkv_groups > 1:
        from ..integrations.transformers import patch_model

        patch_model(model, window_size=extra_window, qkv_groups=args.qkv_groups)
    if getattr(args, "lora_dim", 0) > 0:
        from .lora import apply_lora, enable_input_grads, only_optimize_lora

        apply_lora(model, args.lora_module_name, args.lora_dim)
        if args.only_optimize_lora:
            only_optimize_lora(model)
            enable_input_grads(model)
    elif getattr(args, "only_optimize_lora", False):
        raise ValueError("--only_optimize_lora needs --lora_dim > 0")
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def model_window(model, args) -> str:
    """What the run's attention window is, in words (for the log)."""
    w = window_setting(args)
    if w == "model":
        own = getattr(model.config, "sliding_window", None)
        return f"the model's own ({own} keys)" if own else "none (the model has no sliding window)"
    return "none" if w is None else str(w)


# ----------------------------------------------------------------------------- export
def _gathered_state_dict(model: nn.Module, zero_stage: int, rank: int) -> Dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the parameters and persistent buffers (rank 0 gets them; other
    ranks get {}). Under ZeRO-3 each parameter is gathered on its own, as DeepSpeed-Chat does."""
    out = {}
    for name, p in model.named_parameters():
        if zero_stage == 3 and hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().float().cpu().clone()
        elif rank == 0:
            out[name] = p.detach().float().cpu().clone()
    if rank == 0:
        for mod_name, module in model.named_modules():
            for b_name, buf in module._buffers.items():
                if buf is not None and b_name not in module._non_persistent_buffers_set:
                    out[f"{mod_name}.{b_name}" if mod_name else b_name] = buf.detach().float().cpu().clone()
    return out


def _densify_patched(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Rewrite the keys of ``patch_model``'s SFTAttention layers into the model's own
    ``q_proj/k_proj/v_proj/o_proj`` keys. qkv_groups=g becomes dense projections whose
    off-diagonal blocks are zero: the same function, so the export reloads exactly."""
    try:
        from ..integrations.transformers import SFTAttentionHF
    except ImportError:
        return
    for name, module in model.named_modules():
        if not isinstance(module, SFTAttentionHF):
            continue
        attn = module.attn
        g, d, c = attn.qkv_groups, attn.head_dim, attn.hidden_size
        hq, hkv, cin = attn.num_heads // g, attn.num_kv_heads // g, c // g
        w = state.pop(f"{name}.attn.qkv_proj.weight")
        b = state.pop(f"{name}.attn.qkv_proj.bias", None)
        per = (hq + 2 * hkv) * d
        dense = {k: torch.zeros(n * g * d, c) for k, n in (("q", hq), ("k", hkv), ("v", hkv))}
        bias = {k: [] for k in "qkv"}
        for i in range(g):
            block = w[i * per * cin:(i + 1) * per * cin].view(per, cin)
            rows = dict(zip("qkv", block.split([hq * d, hkv * d, hkv * d], 0)))
            for k, n in (("q", hq), ("k", hkv), ("v", hkv)):
                dense[k][i * n * d:(i + 1) * n * d, i * cin:(i + 1) * cin] = rows[k]
            if b is not None:
                for k, part in zip("qkv", b[i * per:(i + 1) * per].split([hq * d, hkv * d, hkv * d])):
                    bias[k].append(part)
        for k in "qkv":
            state[f"{name}.{k}_proj.weight"] = dense[k]
            if b is not None:
                state[f"{name}.{k}_proj.bias"] = torch.cat(bias[k])
        for suffix in ("weight", "bias"):
            t = state.pop(f"{name}.attn.o_proj.{suffix}", None)
            if t is not None:
                state[f"{name}.o_proj.{suffix}"] = t
        for key in [k for k in state if k.startswith(f"{name}.attn.")]:
            state.pop(key)  # non-persistent helpers (rotary tables)


def save_hf_checkpoint(model: nn.Module, tokenizer, output_dir: str, zero_stage: int, rank: int) -> None:
    """``output_dir/{config.json, model.safetensors, tokenizer files}`` that
    ``AutoModelForCausalLM.from_pretrained(output_dir)`` reloads with any attention
    implementation (the saved config names none); LoRA layers are folded into their weights.
    Collective under ZeRO-3: call on every rank."""
    from transformers import AutoModelForCausalLM

    state = _gathered_state_dict(model, zero_stage, rank)
    if rank != 0:
        return
    from .lora import fold_into_state

    fold_into_state(model, state)
    _densify_patched(model, state)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.use_cache = True
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", "float32")  # what the export holds
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    result = plain.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"save_hf_checkpoint: keys the plain model lacks: {result.unexpected_keys[:4]}")
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"save_hf_checkpoint: no value for {missing[:4]}")
    os.makedirs(output_dir, exist_ok=True)
    plain.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
