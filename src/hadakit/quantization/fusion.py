"""Offline fusion of the attention output's rotation into the value projection.

The input of ``o_proj`` is the attention output: per query head, a convex combination of that head's value vectors.
A rotation ``R`` of ``head_dim`` applied to every value vector (``v_proj``'s output rows, offline) therefore comes out
of the attention unchanged as ``I ⊗ R`` on ``o_proj``'s input — and ``o_proj``'s weight absorbs its inverse
(``W_o·(I ⊗ R)ᵀ``), so the model computes the same function with both weights rotated. Of a full rotation of
``o_proj``'s input, ``(H_heads ⊗ H_d)·(I ⊗ D)``, only the cheap mix across heads ``H_heads ⊗ I`` is left online
(QuaRot's split; with grouped-query attention ``R`` is the same for every query head of a KV head, as it must be).

Nothing is assumed about the architecture beyond finding the pair by name (``v_proj``/``o_proj`` beside a head
size, or BERT's ``self.value``/``output.dense``): the fused model is run on a probe sequence against the original,
and if any output moves by more than ``FUSION_TOLERANCE`` (relative, fp32) — a norm on the values, a gated value
path, anything that is not a convex combination — every fusion is undone and the rotations stay online.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hadakit.quantization.structure import head_dim as _head_dim
from hadakit.transforms import HadamardRotation, HeadMixRotation
from hadakit.transforms.spec import layer_seed

FUSION_TOLERANCE = 1e-4  # relative L2 change of the model's output allowed by an exact fusion (fp32 rounding)


@dataclass
class ValueOutputPair:
    attention: str
    v_name: str
    o_name: str
    head_dim: int
    kv_heads: int
    heads: int


@dataclass
class FusionResult:
    """What ``fuse_value_rotations`` did: the online rotation left for each ``o_proj`` (None: nothing left, one
    head), the pairs fused, and why not, when not."""

    online: dict[str, HeadMixRotation | None] = field(default_factory=dict)
    pairs: list[ValueOutputPair] = field(default_factory=list)
    probe_error: float = 0.0
    refused: str | None = None


def _linear(mod) -> nn.Linear | None:
    return mod if isinstance(mod, nn.Linear) else None


def find_value_output_pairs(model: nn.Module) -> list[ValueOutputPair]:
    """Every attention block's (value projection, output projection) pair with its head layout."""
    pairs = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if _linear(getattr(mod, "v_proj", None)) is not None and _linear(getattr(mod, "o_proj", None)) is not None:
            v, o, hd, vn, on = mod.v_proj, mod.o_proj, _head_dim(mod), "v_proj", "o_proj"
        elif _linear(getattr(getattr(mod, "self", None), "value", None)) is not None and \
                _linear(getattr(getattr(mod, "output", None), "dense", None)) is not None:
            v, o, hd, vn, on = mod.self.value, mod.output.dense, _head_dim(mod.self), "self.value", "output.dense"
        else:
            continue
        if hd is None or v.out_features % hd or o.in_features % hd:
            continue
        pairs.append(ValueOutputPair(name, prefix + vn, prefix + on, hd, v.out_features // hd, o.in_features // hd))
    return pairs


def _probe_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", None) \
        if getattr(out, "logits", None) is not None else out.last_hidden_state
    return out.float()


def default_probe(model: nn.Module, length: int = 24, seed: int = 0) -> torch.Tensor:
    """A seeded random token sequence within the model's vocabulary (its input embedding's size)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else \
        next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    vocab = emb.num_embeddings if isinstance(emb, nn.Embedding) else \
        int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab <= 0:
        raise ValueError(f"{type(model).__name__}: cannot tell the vocabulary size for a probe; pass probe=token ids")
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return torch.randint(0, min(vocab, 30_000), (1, length), generator=g).to(device)


@torch.no_grad()
def fuse_value_rotations(model: nn.Module, *, signs: str = "fixed", seed: int = 0, probe: torch.Tensor | None = None
                         ) -> FusionResult:
    """Rotate every value projection's output per head and its output projection's input to match, in place
    (module docstring); returns the online rotation left for each output projection. The model's function is
    unchanged (checked on ``probe``, token ids ``[1, L]``, a seeded random sequence by default)."""
    result = FusionResult()
    pairs = find_value_output_pairs(model)
    if not pairs:
        result.refused = "no attention block with a value/output projection pair and a head size"
        return result
    probe = default_probe(model) if probe is None else probe
    ref = _probe_output(model, probe)
    saved = {}
    for p in pairs:
        v, o = model.get_submodule(p.v_name), model.get_submodule(p.o_name)
        saved[p.v_name] = (v.weight.detach().clone(), None if v.bias is None else v.bias.detach().clone())
        saved[p.o_name] = (o.weight.detach().clone(), None)
        r = HadamardRotation(p.head_dim, signs=signs, seed=layer_seed(seed, p.v_name), fallback="dct").to(v.weight.device)
        # v_proj: out rows grouped by KV head; each head's block becomes R·W_v (R applied along head_dim).
        wv = v.weight.detach().unflatten(0, (p.kv_heads, p.head_dim))       # [kv, d, in]
        v.weight.copy_(r(wv.transpose(1, 2)).transpose(1, 2).flatten(0, 1))
        if v.bias is not None:
            v.bias.copy_(r(v.bias.detach().unflatten(0, (p.kv_heads, p.head_dim))).flatten())
        # o_proj: W_o·(I ⊗ R)ᵀ, R applied to each head's slice of every row.
        o.weight.copy_(r(o.weight.detach().unflatten(1, (p.heads, p.head_dim))).flatten(1))
        result.online[p.o_name] = None if p.heads == 1 else \
            HeadMixRotation(p.heads, p.head_dim, signs=signs, seed=layer_seed(seed, p.o_name)).to(o.weight.device)
    out = _probe_output(model, probe)
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    result.probe_error = err
    if not err <= FUSION_TOLERANCE:
        for name, (w, b) in saved.items():
            mod = model.get_submodule(name)
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
        result.online.clear()
        result.refused = (f"fusing the value rotation changed the model's output by {err:.2e} (relative) on a probe "
                          f"sequence, above {FUSION_TOLERANCE:g}: this attention is not a convex combination of "
                          f"values (e.g. a norm with weights on them), so the rotations stay online")
        return result
    result.pairs = pairs
    return result
