"""``QuantLinear`` (a drop-in ``nn.Linear`` trained with quantized products) and ``convert`` (swap a model's)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .functional import quant_linear
from hadakit.selection import check_patterns, matching_pattern

from .lbp_wht import LbpWhtLinear, lbp_wht_linear
from .recipe import LbpWhtRecipe, TrainingRecipe, get_training_recipe

__all__ = ["ConvertReport", "QuantLinear", "convert"]


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward ``x·Wᵀ`` and backward ``dy·W``, ``dyᵀ·x`` products run as ``recipe`` says.

    Same constructor (``in_features, out_features, bias, device, dtype``) plus ``recipe`` (a name from
    :func:`~hadakit.training.list_training_recipes` or a :class:`~hadakit.training.TrainingRecipe`), same
    parameters and ``state_dict`` keys (``weight``, ``bias``), same initialization: a checkpoint moves between the
    two classes unchanged. The parameters stay in their own dtype (the master weights); quantization happens only
    inside the products. It is a subclass of ``nn.Linear``, so ``isinstance(layer, nn.Linear)`` holds.

    >>> import torch
    >>> layer = QuantLinear(64, 32, recipe="mxfp4")
    >>> layer(torch.randn(8, 64)).shape
    torch.Size([8, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe: TrainingRecipe | str | dict = "bf16"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = get_training_recipe(recipe)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: TrainingRecipe | str | dict = "bf16") -> "QuantLinear":
        """A QuantLinear that shares ``linear``'s parameters (the same ``nn.Parameter`` objects: an optimizer
        built before the swap keeps working; ``copy.deepcopy`` the layer first for an independent copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    dtype=w.dtype, recipe=recipe)
        layer.weight = w
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.recipe, LbpWhtRecipe):  # low-rank backprop: its own autograd function (lbp_wht.py)
            return lbp_wht_linear(x, self.weight, self.bias, self.recipe.config)
        return quant_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name or '(custom)'}"


@dataclass
class ConvertReport:
    """What :func:`convert` did: ``swapped`` rows ``(name, in_features, out_features, bias)``, ``skipped`` rows
    ``(name, reason)``; ``str(report)`` is a readable table."""

    recipe: str
    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convert: recipe {self.recipe}: swapped {len(self.swapped)} nn.Linear, skipped {len(self.skipped)}"]
        width = max([len(r[0]) for r in self.swapped + self.skipped] + [4])
        for name, i, o, b in self.swapped:
            lines.append(f"  swapped  {name:<{width}}  {i:>6} -> {o:<6}{'  +bias' if b else ''}")
        for name, why in self.skipped:
            lines.append(f"  skipped  {name:<{width}}  ({why})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe,
                "swapped": [dict(name=n, in_features=i, out_features=o, bias=b) for n, i, o, b in self.swapped],
                "skipped": [dict(name=n, reason=r) for n, r in self.skipped]}


def convert(model: nn.Module, recipe: TrainingRecipe | str | dict, ignore=(), *, targets=(), skip=None,
            verbose: bool = True) -> ConvertReport:
    """Replace, in place, every ``nn.Linear`` of ``model`` selected by ``targets`` / ``ignore`` by a
    :class:`QuantLinear` with ``recipe`` (sharing its parameters).

    ``targets`` / ``ignore``: name patterns with the rule of :mod:`hadakit.selection`, the same rule a
    quantization recipe's ``targets`` / ``ignore`` and ``inspect`` use: a plain name matches as a substring
    (``"lm_head"`` skips ``lm_head`` and ``model.lm_head``), a glob matches the name or a dotted suffix
    (``"blocks.0.*"``, ``"*attn*"``), ``re:REGEX`` matches from the start, a class name matches its modules;
    ``targets`` empty means every linear. ``skip`` is the older name of ``ignore``. Subclasses of
    ``nn.Linear`` (e.g. ``MultiheadAttention.out_proj``, whose weight is used without calling the module) and layers
    that already are QuantLinear are reported as skipped. An :class:`~hadakit.training.LbpWhtRecipe` (``"lbp_wht"``,
    ``"lbp_wht:8"``) swaps in :class:`~hadakit.training.LbpWhtLinear` instead (same sharing). Returns a :class:`ConvertReport`, printed when
    ``verbose``. A model that is itself an ``nn.Linear`` cannot be replaced in place: use
    ``QuantLinear.from_linear``.
    """
    recipe = get_training_recipe(recipe)
    if skip is not None:
        if ignore:
            raise TypeError("convert: pass the patterns as ignore= (skip= is its older name), not both")
        ignore = skip
    if isinstance(ignore, str):
        ignore = (ignore,)
    if isinstance(targets, str):
        targets = (targets,)
    ignore = check_patterns(ignore, "convert: ignore")
    targets = check_patterns(targets, "convert: targets")
    if type(model) is nn.Linear or isinstance(model, QuantLinear):
        raise TypeError("convert: the model is itself a linear layer; use QuantLinear.from_linear(model, recipe)")
    report = ConvertReport(recipe.name or "(custom)")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if isinstance(module, QuantLinear):
            report.skipped.append((name, f"already QuantLinear ({module.recipe.name or 'custom recipe'})"))
            continue
        if isinstance(module, LbpWhtLinear):
            report.skipped.append((name, "already LbpWhtLinear"))
            continue
        if type(module) is not nn.Linear:
            report.skipped.append((name, f"{type(module).__name__} is a subclass of nn.Linear"))
            continue
        pat = matching_pattern(name, type(module).__name__, ignore)
        if pat is not None:
            report.skipped.append((name, f"matches ignore pattern {pat!r}"))
            continue
        if targets and matching_pattern(name, type(module).__name__, targets) is None:
            report.skipped.append((name, "matches no target pattern"))
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(recipe, LbpWhtRecipe):
            setattr(parent, attr, LbpWhtLinear.from_linear(module, recipe.config))
        else:
            setattr(parent, attr, QuantLinear.from_linear(module, recipe))
        report.swapped.append((name, module.in_features, module.out_features, module.bias is not None))
    unused = [p for p in ignore if not any(r[1] == f"matches ignore pattern {p!r}" for r in report.skipped)]
    if unused and verbose:
        print(f"convert: note: ignore pattern(s) {unused} matched no nn.Linear")
    if verbose:
        print(report)
    return report
