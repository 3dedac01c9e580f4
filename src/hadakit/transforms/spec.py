"""The one rotation grammar of hadakit: what ``quantize`` recipes (``w4a4:random-block-128:gptq``), ``inspect``
(``--rotations hadamard,block-32``) and the training recipes write for an online Hadamard rotation.

=========================== ==================================================================================
name                        rotation
=========================== ==================================================================================
``none``                    identity
``hadamard``                one orthonormal Hadamard ``H`` over the whole dimension
``random``                  ``H·D``: Hadamard times a seeded random ±1 diagonal
``block-<b>``               block-diagonal ``H`` of size ``b`` (``b`` must have a Hadamard matrix: 32, 128, 640…)
``random-block-<b>``        block-diagonal ``H·D``
=========================== ==================================================================================

    >>> from hadakit.transforms.spec import parse_rotation
    >>> parse_rotation("random-block-128")
    RotationSpec(block_size=128, signs='fixed')
    >>> str(parse_rotation("block-32"))
    'block-32'
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

__all__ = ["ROTATION_GRAMMAR", "RotationSpec", "layer_seed", "parse_rotation"]

ROTATION_GRAMMAR = ("none, hadamard, random (H·D with seeded signs), block-<b> (block-diagonal H, e.g. block-32, "
                    "block-128), random-block-<b>")


@dataclass(frozen=True)
class RotationSpec:
    """A parsed rotation name: ``block_size`` (``None``: the whole dimension) and ``signs`` (``"none"`` or
    ``"fixed"``: a seeded random ±1 diagonal). ``str()`` gives the name back."""

    block_size: int | None = None
    signs: str = "none"

    def __post_init__(self):
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or self.block_size < 1):
            raise ValueError(f"rotation block size must be a positive integer (e.g. 32 or 128), got "
                             f"{self.block_size!r}")
        if self.signs not in ("none", "fixed"):
            raise ValueError(f"rotation signs must be 'none' or 'fixed', got {self.signs!r}")

    def __str__(self) -> str:
        base = "random" if self.signs == "fixed" else "hadamard"
        if self.block_size is None:
            return base
        return f"random-block-{self.block_size}" if self.signs == "fixed" else f"block-{self.block_size}"


def parse_rotation(text: str) -> RotationSpec | None:
    """The :class:`RotationSpec` of a rotation name, ``None`` for ``"none"``; a ``ValueError`` that lists the
    grammar for anything else (names are case-insensitive; surrounding spaces are ignored)."""
    if not isinstance(text, str):
        raise TypeError(f"a rotation is a name ({ROTATION_GRAMMAR}), got {type(text).__name__}")
    name = text.strip().lower()
    if name == "none":
        return None
    if name in ("hadamard", "random"):
        return RotationSpec(None, "fixed" if name == "random" else "none")
    m = re.fullmatch(r"(random-)?block-(\S*)", name)
    if m:
        try:
            block = int(m.group(2))
        except ValueError:
            raise ValueError(f"rotation {text!r}: the block size must be a whole number, as in block-32 or "
                             f"block-128; got {m.group(2)!r}") from None
        if block < 1:
            raise ValueError(f"rotation {text!r}: the block size must be a positive integer, as in block-32 or "
                             f"block-128")
        return RotationSpec(block, "fixed" if m.group(1) else "none")
    raise ValueError(f"unknown rotation {text!r}; valid rotations: {ROTATION_GRAMMAR}")


def layer_seed(base: int, name: str) -> int:
    """The seed of layer ``name``'s random signs under a recipe seed ``base``: distinct per layer, reproducible, the
    same in ``quantize`` and ``inspect`` (so ``inspect`` analyses exactly the rotations the quantizer applies)."""
    return base * 1_000_003 + zlib.crc32(name.encode())
