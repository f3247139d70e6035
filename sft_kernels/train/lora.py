"""LoRA the way DeepSpeed-Chat's step 1 applies it (``--lora_dim``, ``--lora_module_name``,
``--only_optimize_lora``, ``--lora_learning_rate``).

Every ``nn.Linear`` whose qualified name contains ``--lora_module_name`` becomes a
:class:`LoRALinear` holding the same ``weight`` / ``bias`` parameters plus two factors::

    y = x W^T + b + (x @ lora_right_weight) @ lora_left_weight * (1 / r)

``lora_right_weight`` is ``(in_features, r)``, drawn from U(-1/sqrt(r), 1/sqrt(r)) (what
``kaiming_uniform_(a=sqrt(5))`` gives for fan-in r), ``lora_left_weight`` is ``(r, out_features)``
and starts at zero, so the converted model computes exactly what the original did. The
scaling is ``lora_scaling / r`` with DeepSpeed-Chat's ``lora_scaling = 1``. The parameter
names are DeepSpeed-Chat's, so its optimizer grouping (LoRA factors in their own group at
``--lora_learning_rate``) and its "drop keys containing 'lora'" export apply unchanged.

``--only_optimize_lora`` freezes every other parameter. The Hugging Face export folds the
update into the weight (:func:`fold_into_state`: ``W + (right @ left)^T / r``) and writes a
plain model, as DeepSpeed-Chat's ``convert_lora_to_linear_layer`` does before saving.

Under ZeRO-3 the model's parameters are already partitioned when the layers are converted
(``weight.ds_shape`` gives the full shape); the new factors are ordinary parameters, which
``deepspeed.initialize`` partitions like the rest.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_PARAM_NAMES = ("lora_right_weight", "lora_left_weight")


class LoRALinear(nn.Module):
    """A linear layer with a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int, lora_scaling: float = 1.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"--lora_dim must be >= 1 to apply LoRA, got {r}")
        self.weight = base.weight
        self.bias = base.bias
        out_features, in_features = getattr(base.weight, "ds_shape", base.weight.shape)
        self.in_features, self.out_features, self.r = int(in_features), int(out_features), int(r)
        self.scaling = lora_scaling / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_right_weight = nn.Parameter(torch.empty(self.in_features, r, **factory))
        self.lora_left_weight = nn.Parameter(torch.zeros(r, self.out_features, **factory))
        with torch.no_grad():
            bound = r ** -0.5
            self.lora_right_weight.uniform_(-bound, bound)
        self.weight.requires_grad_(False)  # DeepSpeed-Chat freezes the base weight of converted layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_right_weight) @ self.lora_left_weight * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``(out_features, in_features)``: what :func:`fuse` adds to ``weight``."""
        return (self.lora_right_weight @ self.lora_left_weight).t() * self.scaling

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, module_name: str, r: int) -> List[str]:
    """Convert the matching ``nn.Linear`` layers in place; returns their names. A ValueError
    when none matches (DeepSpeed-Chat would train nothing with ``--only_optimize_lora``)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_name in n]
    if not names:
        sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
        raise ValueError(f"--lora_module_name {module_name!r} matches no nn.Linear of {type(model).__name__} "
                         f"(its linear layers are named like {sample}); e.g. 'model.layers.' for Llama-style models, "
                         "'decoder.layers.' for OPT")
    for n in names:
        _set_child(model, n, LoRALinear(model.get_submodule(n), r))
    return names


def only_optimize_lora(model: nn.Module) -> int:
    """Freeze everything but the LoRA factors; returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        train = any(k in name for k in LORA_PARAM_NAMES)
        p.requires_grad_(train)
        n += p.numel() if train else 0
    return n


def enable_input_grads(model: nn.Module) -> None:
    """With every embedding frozen, make the embedding output require grad so gradient
    checkpointing (which needs a differentiable input) still back-propagates into the LoRA factors."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))


def fold_into_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> int:
    """Rewrite a full state dict of ``model`` (as the export gathers it) into the plain model's:
    ``W + B^T A^T / r`` for every :class:`LoRALinear`, its factor keys removed. Returns the count."""
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        right = state.pop(f"{name}.lora_right_weight")
        left = state.pop(f"{name}.lora_left_weight")
        w = state[f"{name}.weight"]
        state[f"{name}.weight"] = (w.double() + (right.double() @ left.double()).t() * m.scaling).to(w.dtype)
        n += 1
    return n
