"""Exporters of hadakit checkpoints to the formats serving engines read.

* :func:`export_compressed_tensors` — a packed hadakit checkpoint (``hadakit quantize ... --out DIR``) as a
  compressed-tensors model directory (the format vLLM serves), online rotations as a ``transform_config``;
  see docs/export.md. Needs the ``export`` extra (``pip install hadakit[export]``).
* :func:`load_exported_model` — such an export loaded back on the CPU with transformers + compressed-tensors,
  online transforms attached (transformers alone ignores them).

The modules here read checkpoints and write files; nothing below ``hadakit.io`` imports it.
"""

from hadakit.io.compressed_tensors import (
    EXPORT_MARKER,
    CalibrationRequiredError,
    ExportError,
    ExportTargetError,
    ScaleNotRepresentableError,
    UnsupportedCheckpointError,
    UnsupportedSchemeError,
    VLLMCompatibilityWarning,
    export_compressed_tensors,
    load_exported_model,
)

__all__ = [
    "EXPORT_MARKER",
    "CalibrationRequiredError",
    "ExportError",
    "ExportTargetError",
    "ScaleNotRepresentableError",
    "UnsupportedCheckpointError",
    "UnsupportedSchemeError",
    "VLLMCompatibilityWarning",
    "export_compressed_tensors",
    "load_exported_model",
]
