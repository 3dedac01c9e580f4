"""The parts of a transformers model the pipeline works on: its linears, its stack of decoder layers, its
attention head size. Shared by the pipeline, the recipes' checks, the KV-cache quantization and the offline fusion,
so none of them imports another for these (the per-layer seed of a random rotation is
``hadakit.transforms.spec.layer_seed``)."""

from __future__ import annotations

import torch
from torch import nn

from hadakit.quantization.qlinear import RotatedQuantLinear
from hadakit.selection import selected

__all__ = ["find_decoder_layers", "find_linears", "head_dim", "linear_weight"]


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, RotatedQuantLinear)) or _is_conv1d(mod)


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (GPT-2's Conv1D stores it transposed)."""
    return mod.weight.t() if _is_conv1d(mod) else mod.weight


def find_linears(model: nn.Module, recipe) -> tuple[dict[str, nn.Module], list[str]]:
    """The linears (``nn.Linear`` / GPT-2 ``Conv1D``) a recipe quantizes, and the names of those it leaves alone,
    by the recipe's ``targets`` / ``ignore`` (the rule of :mod:`hadakit.selection`)."""
    chosen, skipped = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            if selected(name, type(mod).__name__, recipe.targets, recipe.ignore):
                chosen[name] = mod
            else:
                skipped.append(name)
    return chosen, skipped


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of repeated blocks: the largest ``nn.ModuleList`` whose items hold linears."""
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and \
                any(isinstance(m, nn.Linear) or _is_conv1d(m) for m in mod[0].modules()):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no stack of layers (nn.ModuleList of blocks with linears)")
    return best


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)




def head_dim(mod: nn.Module) -> int | None:
    """An attention module's head size (``head_dim`` on Llama/Gemma/Qwen, ``attention_head_size`` on BERT)."""
    for attr in ("head_dim", "attention_head_size"):
        if isinstance(getattr(mod, attr, None), int):
            return getattr(mod, attr)
    return None
