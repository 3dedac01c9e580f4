"""Module forms of the transforms, whose state (random signs, sign-resampling step) saves with ``state_dict``."""

from __future__ import annotations

import torch
from torch import nn

from hadakit.transforms import functional as F

SIGN_MODES = ("none", "fixed", "per_call")


def _step_seed(seed: int, step: int) -> int:
    # A distinct, reproducible seed per (seed, step) pair, so per-step signs need no generator state in checkpoints.
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**63 - 1)


@torch.library.custom_op("hadakit::step_signs", mutates_args=())
def step_signs(step: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``random_signs(n, _step_seed(seed, step))`` (float32, on ``step``'s device): the signs of step ``step``.

    A custom op so that ``torch.compile(fullgraph=True)`` of a ``signs="per_call"`` rotation sees one opaque call
    instead of a ``torch.Generator`` created mid-graph (which Dynamo cannot trace); eager and compiled draws agree.
    """
    return F.random_signs(n, _step_seed(seed, int(step)), device=step.device)


@step_signs.register_fake
def _step_signs_fake(step, n, seed):
    return torch.empty(n, dtype=torch.float32, device=step.device)


class HadamardRotation(nn.Module):
    """An orthogonal Hadamard rotation of size ``n`` along ``dim``, optionally randomized and/or block-diagonal.

    Args:
        n: the size of the rotated dimension.
        block_size: rotate contiguous blocks of this size independently (default: the whole ``n``).
        signs: ``"none"`` (plain H), ``"fixed"`` (H·D with signs drawn once from ``seed``) or ``"per_call"``
            (new signs at every forward in training mode, reproducible from ``seed`` and the step counter).
        seed: seed of the random signs.
        fallback, fallback_seed: as in ``hadamard_transform``, for sizes without a Hadamard matrix.
        dim: the dimension to rotate.

    Example:
        >>> import torch, hadakit
        >>> rot = hadakit.HadamardRotation(640, signs="fixed", seed=1)
        >>> x = torch.randn(3, 640)
        >>> torch.allclose(rot.inverse(rot(x)), x, atol=1e-5)
        True
        >>> rot2 = hadakit.HadamardRotation(640, signs="fixed", seed=2)
        >>> _ = rot2.load_state_dict(rot.state_dict()); torch.equal(rot2(x), rot(x))
        True
    """

    def __init__(
        self,
        n: int,
        *,
        block_size: int | None = None,
        signs: str = "none",
        seed: int = 0,
        fallback: str | None = None,
        fallback_seed: int = 0,
        dim: int = -1,
    ):
        super().__init__()
        if signs not in SIGN_MODES:
            raise ValueError(f"signs must be one of {SIGN_MODES}, got {signs!r}")
        self.n = n
        self.block_size = block_size
        self.sign_mode = signs
        self.seed = seed
        self.fallback = fallback
        self.fallback_seed = fallback_seed
        self.dim = dim
        # Validate the size now, not at the first forward.
        self.plan = F.transform_plan(n, block_size=block_size, fallback=fallback, fallback_seed=fallback_seed)
        if signs == "none":
            self.register_buffer("signs", None)
        else:
            self.register_buffer("signs", F.random_signs(n, seed))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def construction(self) -> str:
        """How the rotation is built (e.g. ``'paley1(q=19) ⊗ sylvester(32)'`` or a fallback)."""
        return self.plan.construction

    def resample(self) -> None:
        """Draw the next step's signs (``signs='per_call'`` does this at every training forward)."""
        if self.signs is None:
            raise RuntimeError("resample() needs signs='fixed' or 'per_call'")
        self.step += 1
        self.signs.copy_(step_signs(self.step, self.n, self.seed))

    def _kwargs(self):
        return dict(block_size=self.block_size, signs=self.signs, fallback=self.fallback,
                    fallback_seed=self.fallback_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sign_mode == "per_call" and self.training:
            self.resample()
        return F.hadamard_transform(x, self.dim, **self._kwargs())

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The transpose (= inverse) of the last forward's rotation."""
        return F.inverse_hadamard_transform(y, self.dim, **self._kwargs())

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``n × n`` orthogonal matrix ``R`` with ``forward(x) = x @ Rᵀ`` (for fusing into weights)."""
        eye = torch.eye(self.n, dtype=dtype, device=self.step.device)
        return F.hadamard_transform(eye, -1, **self._kwargs()).t()

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return f"n={self.n}{block}, signs={self.sign_mode!r}, construction={self.construction!r}"


class StructuredRotation(nn.Module):
    """The two-block structured rotation ``H·D2·H·D1`` with seeded signs (saved in ``state_dict``)."""

    def __init__(self, n: int, *, seed: int = 0, block_size: int | None = None, dim: int = -1):
        super().__init__()
        self.n, self.block_size, self.dim = n, block_size, dim
        self.plan = F.transform_plan(n, block_size=block_size)
        self.register_buffer("signs1", F.random_signs(n, _step_seed(seed, 0)))
        self.register_buffer("signs2", F.random_signs(n, _step_seed(seed, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.structured_rotation(x, self.signs1, self.signs2, self.dim, block_size=self.block_size)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.structured_rotation(y, self.signs1, self.signs2, self.dim, block_size=self.block_size, inverse=True)

    def extra_repr(self) -> str:
        return f"n={self.n}, block_size={self.block_size}, construction={self.plan.construction!r}"


class HeadMixRotation(nn.Module):
    """``H_heads ⊗ I_head_dim``: a Hadamard across the heads of a ``heads · head_dim`` vector, every channel of a head
    mixed only with the same channel of the other heads.

    It is the online half of a full rotation of the attention output whose per-head half ``I ⊗ R`` is fused into the
    value projection offline (QuaRot's split of ``H_{heads·d} = H_heads ⊗ H_d``): the values come out of ``v_proj``
    already rotated per head, and this cheap mix finishes the rotation at ``o_proj``'s input.

    Example:
        >>> import torch, hadakit
        >>> from hadakit.transforms.rotations import HeadMixRotation
        >>> mix = HeadMixRotation(4, 256, signs="fixed", seed=0)
        >>> x = torch.randn(3, 1024)
        >>> torch.allclose(mix.inverse(mix(x)), x, atol=1e-5)
        True
    """

    def __init__(self, heads: int, head_dim: int, *, signs: str = "none", seed: int = 0, fallback: str | None = "dct"):
        super().__init__()
        self.heads, self.head_dim, self.n = heads, head_dim, heads * head_dim
        self.block_size = None
        self.mix = HadamardRotation(heads, signs=signs, seed=seed, fallback=fallback, dim=-2)

    @property
    def sign_mode(self) -> str:
        return self.mix.sign_mode

    @property
    def signs(self) -> torch.Tensor | None:
        return self.mix.signs

    @property
    def construction(self) -> str:
        return f"{self.mix.construction} ⊗ I({self.head_dim}) [per-head part fused into v_proj]"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x.unflatten(-1, (self.heads, self.head_dim))).flatten(-2)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.mix.inverse(y.unflatten(-1, (self.heads, self.head_dim))).flatten(-2)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``n × n`` orthogonal matrix ``R`` with ``forward(x) = x @ Rᵀ``."""
        eye = torch.eye(self.n, dtype=dtype, device=self.mix.step.device)
        return self.forward(eye).t()

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, signs={self.sign_mode!r}"
