"""Evaluation: perplexity over token windows and greedy sample generation."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

__all__ = ["embedding_cosine", "generate_samples", "next_token_nll", "perplexity", "sentence_embeddings",
           "window_nll"]


def _device(model: Any) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _as_windows(windows: Any) -> torch.Tensor:
    if hasattr(windows, "input_ids") and not isinstance(windows, torch.Tensor):
        windows = windows.input_ids
    if not isinstance(windows, torch.Tensor):
        windows = torch.as_tensor(windows)
    if windows.dim() == 1:
        windows = windows.unsqueeze(0)
    if windows.dim() != 2 or windows.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(
            f"windows must be an integer tensor [n_windows, length] (see make_windows), "
            f"got dtype {windows.dtype} and shape {tuple(windows.shape)}"
        )
    if windows.shape[1] < 2:
        raise ValueError(f"windows need at least 2 tokens each (one to predict), got length {windows.shape[1]}")
    return windows.long()


NLL_CHUNK = 64  # positions per log-softmax in next_token_nll: 64 MB of float32 for Gemma's 262144-token vocabulary


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, *, chunk: int | None = NLL_CHUNK) -> torch.Tensor:
    """Summed NLL ``Σ −log softmax(logits[i])[targets[i]]`` over rows ``logits [N, V]``, ``targets [N]`` (float32,
    as ``cross_entropy(logits.float(), targets, reduction="sum")``), bit for bit: the log-softmax runs on ``chunk``
    rows at a time (each row's log-softmax is computed on its own, so it does not depend on the chunk) and the picked
    log-probabilities are summed by ``nll_loss`` over all ``N`` rows at once, the very reduction ``cross_entropy``
    ends in. Peak temporary memory: ``chunk × V`` floats instead of ``N × V``. ``chunk=None``: ``cross_entropy``."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"next_token_nll takes logits [N, V] and targets [N], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows or None, got {chunk}")
    n = logits.shape[0]
    if chunk is None or n <= chunk:
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    picked = torch.empty(n, 1, dtype=torch.float32, device=logits.device)
    for a in range(0, n, chunk):
        lsm = torch.log_softmax(logits[a:a + chunk].float(), dim=-1)
        picked[a:a + chunk] = lsm.gather(1, targets[a:a + chunk, None])
        del lsm
    # nll_loss on the picked values [N, 1] (class 0 each): the same values summed in the same order as above
    return torch.nn.functional.nll_loss(picked, torch.zeros(n, dtype=torch.long, device=logits.device),
                                        reduction="sum")


class _HeadCapture(torch.nn.Module):
    """Stands in for a causal LM's output head during one forward: keeps the final hidden states and computes the
    head on the last position only, so the model's own post-processing of the logits (e.g. Gemma's final logit
    soft-capping) runs on that one row and can be checked against ours."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return self.head(hidden[..., -1:, :])


def _head_slot(model: Any) -> tuple[str, torch.nn.Module] | None:
    """The attribute of ``model`` that holds its output head (``lm_head`` for transformers' causal LMs), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        return None
    for name, child in model.named_children():
        if child is head:
            return name, head
    return None


def _post_process(model: Any, logits: torch.Tensor) -> torch.Tensor:
    """What transformers' causal LMs do to the head's output before returning it: Gemma 2/3's final soft-capping
    (the same operations in the same order), nothing for the others. Checked against the model on every batch."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


HEAD_MIN_ROWS = 16  # BLAS computes a product of 1-3 rows (a gemv) in another order than the same rows of a gemm


def _head_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """Position ranges ``[a, z)`` covering ``0..n`` for the head: ``max(chunk, HEAD_MIN_ROWS)`` positions each, a
    last range shorter than ``HEAD_MIN_ROWS`` merged into the one before, so that every call is a matrix product
    whose rows BLAS computes exactly as it does inside the whole ``[L, V]`` product."""
    step = max(chunk, HEAD_MIN_ROWS)
    bounds = list(range(0, n, step)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < HEAD_MIN_ROWS:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def _chunked_window_nll(model: Any, batch: torch.Tensor, chunk: int) -> torch.Tensor | None:
    """:func:`window_nll`'s sum without ever holding the ``[b, L, V]`` logits: the decoder runs once with the head
    replaced by :class:`_HeadCapture`, then the head runs on ``chunk`` positions at a time. None when the model has
    no recognisable head or when its own last-position logits differ from ours (an unknown post-processing): the
    caller then takes the plain path."""
    slot = _head_slot(model)
    if slot is None:
        return None
    name, head = slot
    capture = _HeadCapture(head)
    setattr(model, name, capture)
    try:
        out = model(input_ids=batch, use_cache=False)
    finally:
        setattr(model, name, head)
    hidden, reference = capture.hidden, getattr(out, "logits", None)
    if hidden is None or reference is None or hidden.shape[:2] != batch.shape:
        return None
    if not torch.equal(_post_process(model, head(hidden[..., -1:, :])), reference):
        return None
    del out, reference
    b, length = batch.shape
    targets = batch[:, 1:]
    picked = torch.empty(b, length - 1, dtype=torch.float32, device=hidden.device)
    for a, z in _head_chunks(length - 1, chunk):
        logits = _post_process(model, head(hidden[:, a:z]))
        lsm = torch.log_softmax(logits.float(), dim=-1)
        picked[:, a:z] = lsm.gather(2, targets[:, a:z, None])[..., 0]
        del logits, lsm
    n = picked.numel()
    # the sum next_token_nll ends in: nll_loss over the picked values [N, 1] in the flattened [b, L-1] order
    return torch.nn.functional.nll_loss(picked.reshape(n, 1), torch.zeros(n, dtype=torch.long, device=picked.device),
                                        reduction="sum")


@torch.no_grad()
def window_nll(model: Any, batch: torch.Tensor, *, chunk: int | None = NLL_CHUNK) -> tuple[float, int]:
    """Summed next-token NLL of a batch of windows ``[b, L]`` (position 0 is not predicted) and the token count.
    ``chunk``: positions per log-softmax (see :func:`next_token_nll`; the result is the same for any value). With a
    ``chunk``, a causal LM whose output head is a submodule (``get_output_embeddings()``) never materialises the
    whole ``[b, L, V]`` logits: its head runs on ``chunk`` positions at a time (at least ``HEAD_MIN_ROWS``; 512 MB
    less for one window of 512 tokens of Gemma's 262,144-token vocabulary), the plain path's numbers bit for bit
    wherever BLAS computes a row of a product independently of the other rows (true of every shape tested here:
    the tests and the quick table check it); any other model takes the plain path."""
    batch = batch.to(_device(model))
    targets = batch[:, 1:]
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows or None, got {chunk}")
    if chunk is not None:
        nll = _chunked_window_nll(model, batch, chunk)
        if nll is not None:
            return float(nll.double()), targets.numel()
    logits = model(input_ids=batch, use_cache=False).logits
    logits = logits[:, :-1]
    nll = next_token_nll(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), chunk=chunk)
    del logits
    return float(nll.double()), targets.numel()


@torch.no_grad()
def perplexity(model: Any, windows: Any, *, batch_size: int = 1, progress: bool = True,
               chunk: int | None = NLL_CHUNK) -> float:
    """exp(mean next-token NLL) over all predicted positions of all windows.

    ``windows`` is a ``[n_windows, length]`` token tensor (:func:`hadakit.io.texts.make_windows`); the first token of
    each window (BOS) is context only and never predicted, so ``n_windows * (length - 1)`` tokens are scored. The
    NLL is computed from float32 log-softmax and accumulated in float64. ``progress`` shows a tqdm bar. ``chunk``:
    positions per log-softmax (:func:`next_token_nll`: the same result for any value, less memory for a large
    vocabulary; ``None``: one ``cross_entropy`` over the whole batch).
    """
    windows = _as_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=windows.shape[0], desc="perplexity", unit="window")
    try:
        for start in range(0, windows.shape[0], batch_size):
            nll, n = window_nll(model, windows[start : start + batch_size], chunk=chunk)
            total += nll
            count += n
            if bar is not None:
                bar.update(min(batch_size, windows.shape[0] - start))
                bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def generate_samples(
    model: Any, tokenizer: Any, prompts: str | Sequence[str], max_new_tokens: int = 20
) -> list[str]:
    """Greedy (deterministic) continuations of each prompt: the new text only, special tokens removed.

    Prompts are run one at a time (no padding), tokenized with the tokenizer's special tokens (BOS for Gemma).
    """
    from transformers import GenerationConfig

    if isinstance(prompts, str):
        prompts = [prompts]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if isinstance(eos, int) else None)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    device = _device(model)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            generated = model.generate(**encoded, generation_config=config)
            new_tokens = generated[0, encoded["input_ids"].shape[1] :]
            outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def sentence_embeddings(model: Any, tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 16
                        ) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalized last hidden states: the sentence-transformers
    embedding of all-MiniLM-L6-v2 and similar encoders. ``[len(sentences), hidden]`` float32."""
    device = _device(model)
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True).to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    return torch.cat(out)


def embedding_cosine(model: Any, reference: torch.Tensor | Any, tokenizer: Any, sentences: Sequence[str]) -> float:
    """Mean cosine similarity between ``model``'s sentence embeddings and ``reference`` (a model, or the
    embeddings :func:`sentence_embeddings` returned for the unquantized one)."""
    ref = reference if isinstance(reference, torch.Tensor) else sentence_embeddings(reference, tokenizer, sentences)
    emb = sentence_embeddings(model, tokenizer, sentences)
    return float((emb * ref).sum(-1).mean())
