"""Evaluation: perplexity and other metrics of a (quantized) model, and the comparison harness of
``hadakit quantize`` (``compare``: recipes side by side, tables and plots). Builds on ``quantization`` and ``io``;
nothing below imports it."""

from hadakit.evaluation.metrics import (embedding_cosine, generate_samples, next_token_nll, perplexity,
                                        sentence_embeddings, window_nll)

__all__ = ["embedding_cosine", "generate_samples", "next_token_nll", "perplexity", "sentence_embeddings",
           "window_nll"]
