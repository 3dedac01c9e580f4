"""Files: loading models (Hugging Face directories, GGUF, the built-in Gemma 3 270M), texts and token windows,
hadakit's packed checkpoints, and exporters to the formats serving engines read.

* :mod:`hadakit.io.loading` — :func:`load_model` and the safety checks on what a directory may contain;
* :mod:`hadakit.io.texts` — the built-in texts, :func:`read_text`, :func:`make_windows`, calibration windows;
* :mod:`hadakit.io.checkpoint` — packed checkpoints (``hadakit.save`` / ``hadakit.load``);
* :mod:`hadakit.io.synthetic` — seeded random Llama/Qwen2-shaped checkpoints of any size, written tensor by tensor
  (for memory, time and exactness tests; random weights say nothing about accuracy);

* :func:`export_compressed_tensors` — a packed hadakit checkpoint (``hadakit quantize ... --out DIR``) as a
  compressed-tensors model directory (the format vLLM serves), online rotations as a ``transform_config``;
  see docs/export.md. Needs the ``export`` extra (``pip install hadakit[export]``).
* :func:`load_exported_model` — such an export loaded back on the CPU with transformers + compressed-tensors,
  online transforms attached (transformers alone ignores them).

The modules here read and write files; they build on ``hadakit.quantization``, and nothing below imports them.
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
from hadakit.io.loading import (cache_root, default_model_path, describe_model, gguf_architecture, gguf_cache_dir,
                                load_model)
from hadakit.io.synthetic import SyntheticDims, write_synthetic_model
from hadakit.io.texts import (CALIBRATION_TEXT, EVAL_TEXT, TextWindows, builtin_texts, calibration_windows,
                              make_windows, read_text, sentences, strip_gutenberg, tokenize_text)

__all__ = [
    "CALIBRATION_TEXT",
    "EVAL_TEXT",
    "SyntheticDims",
    "TextWindows",
    "builtin_texts",
    "cache_root",
    "calibration_windows",
    "default_model_path",
    "describe_model",
    "gguf_architecture",
    "gguf_cache_dir",
    "load_model",
    "make_windows",
    "read_text",
    "sentences",
    "strip_gutenberg",
    "tokenize_text",
    "write_synthetic_model",
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
