"""Which linears a recipe touches: the one selection rule of ``quantize``, ``inspect`` and ``convert``.

A selection is two lists of patterns, ``targets`` and ``ignore`` (as in compressed-tensors' schemes): a linear is
selected when its qualified module name matches a target (an empty ``targets`` means every linear) and matches no
ignore pattern. One pattern matches a module named ``name`` of class ``cls`` when it is

* ``re:REGEX`` — the regular expression matches from the start of ``name`` (``re.match``, as compressed-tensors);
* a glob (contains ``*``, ``?`` or ``[``) — it matches ``name`` or one of its dotted suffixes (``fnmatch``):
  ``"layers.0.*"`` matches ``model.layers.0.mlp.up_proj``;
* the class name itself (``"Linear"``, ``"Conv1D"``);
* any other string — a substring of ``name`` (``"lm_head"`` matches ``lm_head`` and ``model.lm_head``; ``"embed"``
  matches ``model.embed_tokens``).

    >>> from hadakit.selection import matches
    >>> matches("model.layers.0.self_attn.q_proj", "Linear", "re:.*self_attn")
    True
    >>> matches("model.layers.10.mlp.up_proj", "Linear", "layers.1.*")
    False
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

__all__ = ["check_patterns", "matches", "matching_pattern", "selected"]


def check_patterns(patterns, what: str) -> tuple[str, ...]:
    """``patterns`` as a tuple of strings; a clear error for anything else or for a regex that does not compile."""
    if isinstance(patterns, str):
        raise TypeError(f"{what} must be a list of name patterns, got the single string {patterns!r}: write "
                        f"[{patterns!r}]")
    if patterns is None:
        return ()
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"{what} must be a list of non-empty name patterns (str), got {patterns!r}")
    patterns = tuple(patterns)
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{what}: pattern {p!r} is not a valid regular expression ({e})") from None
    return patterns


def _one(name: str, cls: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))
    return pattern == cls or pattern in name


def matching_pattern(name: str, cls: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` that matches the module ``name`` of class ``cls``, or None."""
    for p in patterns:
        if _one(name, cls, p):
            return p
    return None


def matches(name: str, cls: str, pattern: str) -> bool:
    """Whether one pattern matches the module ``name`` of class ``cls`` (the rule in the module docstring)."""
    return _one(name, cls, pattern)


def selected(name: str, cls: str, targets: Iterable[str] = (), ignore: Iterable[str] = ()) -> bool:
    """Whether a linear named ``name`` of class ``cls`` is selected by ``targets`` (empty: all) and ``ignore``."""
    targets = tuple(targets)
    if targets and matching_pattern(name, cls, targets) is None:
        return False
    return matching_pattern(name, cls, ignore) is None
