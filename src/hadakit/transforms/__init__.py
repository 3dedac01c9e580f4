"""Hadamard matrices and transforms (full, inverse, randomized, block-diagonal, two-block structured)."""

from hadakit.transforms.functional import (
    block_hadamard_transform,
    hadamard_transform,
    inverse_hadamard_transform,
    random_signs,
    randomized_hadamard_transform,
    structured_rotation,
    transform_plan,
)
from hadakit.transforms.matrices import base_order, construction, covered_orders, hadamard_matrix
from hadakit.transforms.plan import TransformPlan, nearest_supported, supported
from hadakit.transforms.rotations import HadamardRotation, HeadMixRotation, StructuredRotation
from hadakit.transforms.sparse import sparse_wht

__all__ = [
    "HadamardRotation",
    "HeadMixRotation",
    "StructuredRotation",
    "TransformPlan",
    "base_order",
    "block_hadamard_transform",
    "construction",
    "covered_orders",
    "hadamard_matrix",
    "hadamard_transform",
    "inverse_hadamard_transform",
    "nearest_supported",
    "random_signs",
    "randomized_hadamard_transform",
    "sparse_wht",
    "structured_rotation",
    "supported",
    "transform_plan",
]
