"""Reuse, across the passes of true-sequential calibration, the outputs of submodules that are already final.

With ``seq`` a decoder layer runs once per input group (q/k/v, o, gate/up, down), each pass stopping at the group
whose inputs it records, and once more at the end to make the next layer's inputs. Every pass recomputes the layer
from its start, although the groups are quantized in execution order: a submodule that *finished* before a pass
stopped depends only on linears that are quantized already (or never will be), so its output on that window is the
same in every later pass. ``StageReuse`` keeps those outputs and returns them instead of running the submodule
again (Gemma 3: attention runs 2 times per layer instead of 4, and each linear about once instead of up to four
times). Nothing is assumed about the architecture: the candidates are the layer's children that hold a linear, and
the linears themselves.

Safety: the first window of every pass still runs every submodule and compares it with the kept output; any
difference (beyond float noise) turns reuse off (``disabled_reason`` says why; the pipeline then stops reusing for
the rest of the run), so a module with hidden state or a layout this reasoning does not cover can cost time but
never change a result.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

REUSE_BUDGET_BYTES = 2 << 30  # outputs kept per layer at most; modules beyond it are simply recomputed
CHECK_RTOL = 1e-5  # the first window's recomputed output must match the kept one this closely (max-norm relative)


def _map(fn: Callable[[torch.Tensor], Any], out):
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map(fn, o) for o in out)
    return out


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


def _same(kept, new) -> bool:
    if isinstance(kept, torch.Tensor):
        if not isinstance(new, torch.Tensor) or kept.shape != new.shape:
            return False
        if not kept.numel():
            return True
        return float((kept - new).abs().max()) <= CHECK_RTOL * float(kept.abs().max())
    if isinstance(kept, (tuple, list)):
        return isinstance(new, (tuple, list)) and len(kept) == len(new) and all(map(_same, kept, new))
    return True  # non-tensor parts (None, ints) are not kept: the submodule produced them identically before


def _candidates(layer: nn.Module, is_linear: Callable[[nn.Module], bool]) -> list[str]:
    """Names (relative to ``layer``) of its children that hold a linear, then of every linear inside it."""
    children = [n for n, c in layer.named_children() if any(is_linear(m) for m in c.modules())]
    linears = [n for n, m in layer.named_modules() if n and is_linear(m) and n not in children]
    return children + linears


class StageReuse:
    """Outputs of one layer's finished submodules, per calibration window, across its ``seq`` passes.

    Use ``with reuse.run(n_windows):`` around a pass and ``reuse.window = j`` before window ``j``; a pass may stop
    early (``_StopForward``): only submodules that finished in every window are kept.
    """

    def __init__(self, layer: nn.Module, is_linear: Callable[[nn.Module], bool], budget: int | None = None):
        self.layer = layer
        self.names = _candidates(layer, is_linear)
        self.budget = REUSE_BUDGET_BYTES if budget is None else budget
        self.kept: dict[str, list] = {}
        self.window = 0
        self.disabled_reason: str | None = None

    @property
    def kept_bytes(self) -> int:
        return sum(_nbytes(o) for outs in self.kept.values() for o in outs)

    def run(self, n_windows: int, keep: bool = True) -> "_Pass":
        """One pass over ``n_windows`` windows; ``keep=False`` for the layer's last pass (nothing comes after it)."""
        return _Pass(self, n_windows, keep)

    def _disable(self, why: str) -> None:
        self.disabled_reason = why
        self.kept.clear()


class _Pass:
    def __init__(self, reuse: StageReuse, n_windows: int, keep: bool):
        self.reuse, self.n_windows, self.keep = reuse, n_windows, keep
        self.fresh: dict[str, list] = {}
        self.reserved = 0  # bytes set aside for this pass's copies
        self.refused: set[str] = set()
        self.undo: list[Callable[[], None]] = []

    def __enter__(self):
        r = self.reuse
        self.kept_bytes = r.kept_bytes
        if r.disabled_reason:
            return self
        for name in r.names:
            mod = r.layer.get_submodule(name)  # looked up per pass: quantized linears replace the originals
            if name in r.kept:
                self._patch(name, mod)
            elif self.keep and not any(name.startswith(k + ".") for k in r.kept):  # in a kept parent: not run
                self.fresh[name] = []
                h = mod.register_forward_hook(lambda m, a, out, name=name: self._record(name, out))
                self.undo.append(h.remove)
        return self

    def _record(self, name: str, out) -> None:
        outs = self.fresh[name]
        window = self.reuse.window
        if window == 0 and not outs:
            # Room for all windows is reserved on the first one (same shapes in every window), so the copies never
            # take more memory than the budget; a submodule that does not fit is not kept.
            need = _nbytes(out) * self.n_windows
            if self.kept_bytes + self.reserved + need <= self.reuse.budget:
                self.reserved += need
            else:
                self.refused.add(name)
        # Not kept either: a submodule called twice in one window.
        if name not in self.refused and len(outs) == window:
            outs.append(_map(lambda t: t.detach().clone(), out))
        else:
            outs.append(None)

    def _patch(self, name: str, mod: nn.Module) -> None:
        r = self.reuse
        original = mod.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook) is kept
        call = mod.forward

        def forward(*args, **kwargs):
            kept = r.kept.get(name)
            if kept is None:  # reuse was turned off mid-pass
                return call(*args, **kwargs)
            if r.window == 0:  # the check: recompute and compare
                out = call(*args, **kwargs)
                if not _same(kept[0], out):
                    r._disable(f"{name}'s output changed between two passes")
                return out
            return _map(torch.Tensor.clone, kept[r.window])  # a copy: the layer may change it in place

        mod.forward = forward

        def restore():
            if original is None:
                del mod.forward
            else:
                mod.forward = original
        self.undo.append(restore)

    def __exit__(self, *exc):
        for undo in reversed(self.undo):
            undo()
        r = self.reuse
        if r.disabled_reason:
            return False
        finished = {n: outs for n, outs in self.fresh.items()
                    if len(outs) == self.n_windows and all(o is not None for o in outs)}
        # A kept parent makes its children's outputs useless: keep the outermost, drop the rest.
        for n in finished:
            for k in [k for k in r.kept if k.startswith(n + ".")]:
                del r.kept[k]
        used = r.kept_bytes
        for n, outs in finished.items():
            if any(n.startswith(p + ".") for p in finished if p != n):
                continue
            size = sum(_nbytes(o) for o in outs)
            if used + size <= r.budget:
                r.kept[n] = outs
                used += size
        return False
