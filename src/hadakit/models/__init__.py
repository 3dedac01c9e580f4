"""Models: loading (HF directories, GGUF, the built-in Gemma 3 270M), text data, evaluation."""

from .data import (
    CALIBRATION_TEXT,
    EVAL_TEXT,
    TextWindows,
    builtin_texts,
    calibration_windows,
    make_windows,
    read_text,
    sentences,
    strip_gutenberg,
    tokenize_text,
)
from .evaluate import embedding_cosine, generate_samples, perplexity, sentence_embeddings, window_nll
from .loading import (
    cache_root,
    default_model_path,
    describe_model,
    gguf_architecture,
    gguf_cache_dir,
    load_model,
)

__all__ = [
    "CALIBRATION_TEXT",
    "EVAL_TEXT",
    "TextWindows",
    "builtin_texts",
    "cache_root",
    "calibration_windows",
    "default_model_path",
    "describe_model",
    "embedding_cosine",
    "generate_samples",
    "gguf_architecture",
    "gguf_cache_dir",
    "load_model",
    "make_windows",
    "perplexity",
    "read_text",
    "sentence_embeddings",
    "sentences",
    "strip_gutenberg",
    "tokenize_text",
    "window_nll",
]
