"""Outlier statistics of a tensor and the quantization gain of a rotation, exact and streamable.

Every statistic here is computed by one accumulator, :class:`StreamingStats`, which reduces a ``[rows, channels]``
tensor batch by batch to a few numbers and ``channels``-long vectors, so a model's activations never need to be
stored. :func:`outlier_stats` is the same accumulator fed once with the whole tensor.

Definitions (``x`` viewed as ``rows × n``: the channel dimension last, every other dimension flattened into rows;
for an activation a row is a token, for a weight ``[out, in]`` a row is an output channel and the channels are the
input features; ``A_c = max_r |x_rc|`` is channel ``c``'s absmax and ``E_c = Σ_r x_rc²`` its energy):

==========================  ==========================================================================================
key                         meaning
==========================  ==========================================================================================
``numel``                   number of values ``N``
``rows`` / ``channels``     ``N / n`` and ``n``
``mean`` / ``std``          mean and population standard deviation of all values
``rms``                     ``sqrt(Σ x² / N)``
``absmax``                  ``max |x|``
``crest``                   ``absmax / rms`` (crest factor; ≈ 4.4 for 10⁵ Gaussian values)
``kurtosis``                Pearson kurtosis of the flattened values, ``m4 / m2²`` with central moments
                            ``m_k = Σ (x - mean)^k / N`` (3 for a Gaussian, 1.8 uniform, large = heavy tails)
``token_kurtosis``          mean over rows of each row's Pearson kurtosis (rows with zero variance are left out);
                            for activations, how heavy-tailed a typical token vector is (what a per-token scale
                            sees)
``channel_absmax_ratio``    ``max_c A_c / median_c A_c`` (median = mean of the two middle values for even ``n``)
``channel_rms_ratio``       ``max_c rms_c / median_c rms_c`` with ``rms_c = sqrt(E_c / rows)``
``top1_energy_share``       ``Σ`` of the ``k = ceil(n / 100)`` largest ``E_c`` over ``Σ_c E_c``: the share of the
                            energy in the top 1 % channels (``k / n`` ≈ 0.01 when no channel stands out)
``outlier_channels``        number of channels with ``rms_c > 6 · median_c rms_c``
==========================  ==========================================================================================

Streaming. A batch ``b`` contributes its count ``n_b``, mean ``μ_b`` and central power sums
``M_k,b = Σ (x - μ_b)^k`` (``k = 2, 3, 4``, in float64), and batches are merged with the exact pairwise update of
Chan et al. / Pébay (2008): with ``δ = μ_b - μ_a`` and ``n = n_a + n_b``,

    μ  = μ_a + δ·n_b/n
    M2 = M2_a + M2_b + δ²·n_a·n_b/n
    M3 = M3_a + M3_b + δ³·n_a·n_b·(n_a - n_b)/n² + 3δ·(n_a·M2_b - n_b·M2_a)/n
    M4 = M4_a + M4_b + δ⁴·n_a·n_b·(n_a² - n_a·n_b + n_b²)/n³ + 6δ²·(n_a²·M2_b + n_b²·M2_a)/n²
                     + 4δ·(n_a·M3_b - n_b·M3_a)/n

This is algebraically the same as accumulating the raw sums ``Σx, Σx², Σx³, Σx⁴`` and expanding
``m4 = S4/N - 4μ·S3/N + 6μ²·S2/N - 3μ⁴``, but without that formula's cancellation when ``|μ| ≫ σ``. The
per-channel vectors are plain running sums (``E_c``) and running maxima (``A_c``); the per-row kurtosis is a running
sum of the rows' kurtoses and a count. All of these are exact under any batching.

Rotations: :func:`make_rotation` turns a name (``"none"``, ``"hadamard"``, ``"random"``, ``"block-32"``,
``"random-block-128"``) into a :class:`hadakit.HadamardRotation` along the last dim. :func:`rotation_gain`
quantizes with and without it and measures both errors in the original basis (after the inverse rotation), which
for an orthogonal rotation equals the error measured in the rotated basis.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hadakit.formats import QuantScheme, fake_quantize, get_scheme, list_schemes
from hadakit.transforms import HadamardRotation, StructuredRotation
from hadakit.transforms.spec import ROTATION_GRAMMAR, layer_seed
from hadakit.transforms.spec import parse_rotation as _parse_rotation_name

__all__ = [
    "ROTATION_NAMES",
    "StreamingStats",
    "format_levels",
    "layer_seed",
    "make_rotation",
    "outlier_stats",
    "parse_rotation",
    "resolve_scheme",
    "rotation_gain",
    "rotation_label",
    "sqnr_db",
]

#: The rotation names :func:`make_rotation` knows (``block-<b>`` / ``random-block-<b>`` take any block size).
ROTATION_NAMES = ("none", "hadamard", "random", "block-<b>", "random-block-<b>")
_ROTATION_HELP = ROTATION_GRAMMAR + ", or a hadakit.HadamardRotation"

#: A channel counts in ``outlier_channels`` when its RMS exceeds this multiple of the median channel RMS.
OUTLIER_RMS_FACTOR = 6.0


# ------------------------------------------------------------------------------------------------------------------
# Formats and rotations
# ------------------------------------------------------------------------------------------------------------------


def resolve_scheme(format: str | QuantScheme | dict) -> QuantScheme:
    """A ``QuantScheme`` from a preset name, a scheme or its dict; unknown names list the presets."""
    if isinstance(format, str) and format.lower() not in list_schemes():
        raise ValueError(f"unknown format {format!r}; valid formats (hadakit.formats presets): "
                         f"{', '.join(list_schemes())}")
    return get_scheme(format)


def format_levels(scheme: str | QuantScheme) -> torch.Tensor:
    """The element grid of a scheme, sorted: the values a scaled element can take (e.g. INT4: −8 … 7 for the
    full-range presets, −7 … 7 restricted; E2M1: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}). Multiply by a group scale to get
    the representable values of that group."""
    scheme = resolve_scheme(scheme)
    el = scheme.element
    kind = getattr(el, "kind", "")
    if kind == "ternary":
        vals = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    elif kind == "binary":
        vals = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    elif hasattr(el, "qmax"):  # INT (symmetric grid; an asymmetric scheme shifts it by the zero point)
        lo = -el.qmax - (1 if getattr(scheme, "int_range", "restricted") == "full" else 0)
        vals = torch.arange(lo, el.qmax + 1, dtype=torch.float64) * 2.0 ** -getattr(el, "frac_bits", 0)
    else:  # minifloat
        vals = torch.tensor(el.decode_table(), dtype=torch.float64)
        vals = vals[torch.isfinite(vals)]
    if kind != "int":  # minifloat tables hold one sign (or both); the grid is symmetric
        vals = torch.cat([vals, -vals])
    return vals.unique().sort().values


def make_rotation(spec: str | nn.Module | None, n: int, *, seed: int = 0, fallback: str | None = "dct"
                  ) -> nn.Module | None:
    """The rotation ``spec`` of size ``n`` along the last dim (``None`` for ``"none"``).

    ``spec``: ``"none"``; ``"hadamard"`` (H); ``"random"`` (H·D, signs from ``seed``); ``"block-<b>"``
    (block-diagonal H of size ``b``); ``"random-block-<b>"`` (block-diagonal H·D); or a ``HadamardRotation`` /
    ``StructuredRotation`` of size ``n``, used as is. Sizes without a Hadamard matrix take the orthogonal
    ``fallback`` (``"dct"`` as in ``hadakit quantize``; ``None`` refuses).
    """
    if spec is None:
        return None
    if isinstance(spec, (HadamardRotation, StructuredRotation)):
        if spec.n != n:
            raise ValueError(f"the rotation has size {spec.n}, but the tensor's last dimension is {n}")
        if getattr(spec, "dim", -1) not in (-1,):
            raise ValueError("pass a rotation along dim=-1 (the channel dimension is moved last)")
        return spec
    parsed = parse_rotation(spec)
    if parsed is None:
        return None
    block, signs = parsed
    if block is not None and n % block:
        raise ValueError(f"rotation {spec!r}: block size {block} does not divide the dimension {n}")
    return HadamardRotation(n, block_size=block, signs=signs, seed=seed, fallback=fallback)


def parse_rotation(spec: str) -> tuple[int | None, str] | None:
    """``(block_size or None, signs mode)`` of a rotation name of the grammar of :mod:`hadakit.transforms.spec`
    (the one ``hadakit quantize`` recipes use), ``None`` for ``"none"``; unknown names raise a ValueError listing
    the valid ones."""
    parsed = _parse_rotation_name(spec)
    return None if parsed is None else (parsed.block_size, parsed.signs)


def rotation_label(spec: str | nn.Module | None) -> str:
    if spec is None:
        return "none"
    if isinstance(spec, str):
        return spec.strip().lower()
    if isinstance(spec, HadamardRotation):
        kind = "random" if spec.sign_mode != "none" else "hadamard"
        return f"{kind}-block-{spec.block_size}" if spec.block_size else kind
    return type(spec).__name__


def _construction(rot: nn.Module | None) -> str:
    if rot is None:
        return "identity"
    plan = getattr(rot, "plan", None)
    return getattr(plan, "construction", type(rot).__name__)


# ------------------------------------------------------------------------------------------------------------------
# Streaming statistics
# ------------------------------------------------------------------------------------------------------------------


def _as_rows(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension, got a 0-d tensor")
    if not x.is_floating_point():
        x = x.float()
    x = x.detach().movedim(dim, -1)
    return x.reshape(-1, x.shape[-1])


def _median(v: torch.Tensor) -> float:
    s = v.double().sort().values
    k = s.numel()
    return float(s[k // 2]) if k % 2 else float((s[k // 2 - 1] + s[k // 2]) / 2)


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


class StreamingStats:
    """Running outlier statistics of ``[rows, n]`` batches (see the module docstring for the formulas).

    >>> import torch
    >>> from hadakit.analysis import StreamingStats, outlier_stats
    >>> x = torch.randn(1000, 64)
    >>> acc = StreamingStats(64)
    >>> for part in x.split(300):
    ...     _ = acc.update(part)
    >>> a, b = acc.result(), outlier_stats(x)
    >>> all(abs(a[k] - b[k]) < 1e-9 for k in ("kurtosis", "token_kurtosis", "top1_energy_share", "std"))
    True
    """

    def __init__(self, n: int):
        self.n = int(n)
        self.count = 0
        self.rows = 0
        self.mean = 0.0
        self.m2 = self.m3 = self.m4 = 0.0
        self.absmax = 0.0
        self.ch_sumsq = torch.zeros(self.n, dtype=torch.float64)
        self.ch_absmax = torch.zeros(self.n, dtype=torch.float64)
        self.row_kurt_sum = 0.0
        self.row_kurt_count = 0

    def update(self, x: torch.Tensor) -> "StreamingStats":
        """Add a batch: a tensor whose last dim has ``n`` channels (every other dim is rows)."""
        return self.merge(StreamingStats.of(x, self.n))

    @classmethod
    def of(cls, x: torch.Tensor, n: int | None = None) -> "StreamingStats":
        """The statistics of one batch (``[..., n]``), ready to :meth:`merge` into running ones."""
        x = _as_rows(x)
        if n is not None and x.shape[-1] != n:
            raise ValueError(f"expected {n} channels in the last dim, got {x.shape[-1]}")
        acc = cls(x.shape[-1])
        if x.numel() == 0:
            return acc
        xd = x.double()
        acc.count = xd.numel()
        acc.rows = xd.shape[0]
        acc.mean = float(xd.mean())
        d = xd - acc.mean
        d2 = d * d
        acc.m2, acc.m3, acc.m4 = float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum())
        ax = xd.abs()
        acc.ch_absmax = ax.amax(0).cpu()
        acc.absmax = float(acc.ch_absmax.max())
        acc.ch_sumsq = (xd * xd).sum(0).cpu()
        # per-row Pearson kurtosis
        dr = xd - xd.mean(1, keepdim=True)
        dr2 = dr * dr
        v = dr2.mean(1)
        k4 = (dr2 * dr2).mean(1)
        ok = v > 0
        acc.row_kurt_count = int(ok.sum())
        acc.row_kurt_sum = float((k4[ok] / (v[ok] * v[ok])).sum()) if acc.row_kurt_count else 0.0
        return acc

    def merge(self, other: "StreamingStats") -> "StreamingStats":
        """Fold another accumulator (e.g. one batch's :meth:`of`) into this one; exact (see the module docstring)."""
        if other.n != self.n:
            raise ValueError(f"cannot merge statistics of {other.n} channels into {self.n}")
        if other.count == 0:
            return self
        self._merge(other.count, other.mean, other.m2, other.m3, other.m4)
        self.rows += other.rows
        self.absmax = max(self.absmax, other.absmax)
        self.ch_sumsq = self.ch_sumsq + other.ch_sumsq
        self.ch_absmax = torch.maximum(self.ch_absmax, other.ch_absmax)
        self.row_kurt_sum += other.row_kurt_sum
        self.row_kurt_count += other.row_kurt_count
        return self

    def _merge(self, nb: int, mb: float, m2b: float, m3b: float, m4b: float) -> None:
        na = self.count
        if na == 0:
            self.count, self.mean, self.m2, self.m3, self.m4 = nb, mb, m2b, m3b, m4b
            return
        n = na + nb
        delta = mb - self.mean
        m2a, m3a, m4a = self.m2, self.m3, self.m4
        self.mean = self.mean + delta * nb / n
        self.m2 = m2a + m2b + delta**2 * na * nb / n
        self.m3 = (m3a + m3b + delta**3 * na * nb * (na - nb) / n**2
                   + 3 * delta * (na * m2b - nb * m2a) / n)
        self.m4 = (m4a + m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                   + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
                   + 4 * delta * (na * m3b - nb * m3a) / n)
        self.count = n

    def channel_rms(self) -> torch.Tensor:
        """Per-channel RMS ``sqrt(E_c / rows)`` (float64, length ``n``)."""
        return (self.ch_sumsq / max(self.rows, 1)).sqrt()

    def result(self) -> dict[str, Any]:
        """The statistics as a dict of floats and ints (keys as in the module docstring)."""
        if self.count == 0:
            raise ValueError("no values were added")
        n_all = self.count
        var = self.m2 / n_all
        energy = float(self.ch_sumsq.sum())
        k = max(1, math.ceil(self.n / 100))
        top = float(self.ch_sumsq.topk(min(k, self.n)).values.sum())
        rms_c = self.channel_rms()
        med_rms = _median(rms_c)
        rms = math.sqrt(energy / n_all)
        return {
            "numel": n_all,
            "rows": self.rows,
            "channels": self.n,
            "mean": self.mean,
            "std": math.sqrt(max(var, 0.0)),
            "rms": rms,
            "absmax": self.absmax,
            "crest": _ratio(self.absmax, rms),
            "kurtosis": _ratio(n_all * self.m4, self.m2 * self.m2),
            "token_kurtosis": (self.row_kurt_sum / self.row_kurt_count) if self.row_kurt_count else math.nan,
            "channel_absmax_ratio": _ratio(float(self.ch_absmax.max()), _median(self.ch_absmax)),
            "channel_rms_ratio": _ratio(float(rms_c.max()), med_rms),
            "top1_energy_share": _ratio(top, energy),
            "outlier_channels": int((rms_c > OUTLIER_RMS_FACTOR * med_rms).sum()) if med_rms > 0 else 0,
        }


def outlier_stats(tensor: torch.Tensor, dim: int = -1) -> dict[str, Any]:
    """Outlier statistics of ``tensor`` with channels along ``dim`` (see the module docstring for each key).

    >>> import torch
    >>> from hadakit.analysis import outlier_stats
    >>> x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    >>> s = outlier_stats(x)
    >>> round(s["kurtosis"], 1), round(s["top1_energy_share"], 3)        # Gaussian: 3, and ≈ 3 / 256
    (3.0, 0.012)
    >>> x[:, 7] *= 30                                                   # one outlier channel
    >>> s = outlier_stats(x)
    >>> s["outlier_channels"], round(s["top1_energy_share"], 2)          # 900 / (900 + 255)
    (1, 0.78)
    """
    x = _as_rows(tensor, dim)
    return StreamingStats(x.shape[-1]).update(x).result()


# ------------------------------------------------------------------------------------------------------------------
# Rotation gain
# ------------------------------------------------------------------------------------------------------------------


def sqnr_db(signal: float, error: float) -> float:
    """``10 · log10(signal / error)`` (``inf`` for zero error)."""
    if error <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / error)


def _quantize(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return fake_quantize(x, scheme, generator=0).to(x.dtype)


def rotation_gain(tensor: torch.Tensor, format: str | QuantScheme = "int4", rotation: str | nn.Module = "random",
                  *, seed: int = 0, fallback: str | None = "dct") -> dict[str, Any]:
    """How much a rotation helps fake-quantizing ``tensor`` with ``format`` (groups along the last dim).

    The tensor is quantized directly (``Q(x)``) and after the rotation (``R⁻¹·Q(R·x)``, rotated along the last dim);
    both errors are measured in the original basis:
    ``sqnr_*_db = 10·log10(Σ x² / Σ (x - x̂)²)`` pooled over all values. For an orthogonal ``R`` this equals the
    SQNR of ``Q`` on ``R·x`` measured in the rotated basis.

    Returns ``format`` (its description), ``rotation`` (label), ``construction``, ``sqnr_before_db``,
    ``sqnr_after_db``, ``gain_db`` (after − before), ``zero_fraction_before`` / ``_after`` (the share of nonzero
    values that quantize to 0) and ``before`` / ``after``: :func:`outlier_stats` of ``x`` and of ``R·x``.

    >>> import torch
    >>> from hadakit.analysis import rotation_gain
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(256, 1024, generator=g); x[:, 3] *= 40            # a planted outlier channel
    >>> r = rotation_gain(x, "int4", "random")
    >>> round(r["sqnr_before_db"]), round(r["sqnr_after_db"])          # INT4 per token: 6 dB -> 20 dB
    (6, 20)
    >>> round(r["zero_fraction_before"], 2), round(r["zero_fraction_after"], 2)   # values rounded to 0
    (0.76, 0.13)
    """
    scheme = resolve_scheme(format)
    x = tensor.detach()
    if not x.is_floating_point():
        x = x.float()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if x.dim() == 0:
        raise ValueError("rotation_gain needs a tensor with at least one dimension")
    rot = make_rotation(rotation, x.shape[-1], seed=seed, fallback=fallback)
    signal = float((x.double() ** 2).sum())
    q = _quantize(x, scheme)
    err_before = float(((x - q).double() ** 2).sum())
    if rot is None:
        xr, qr, back = x, q, q
    else:
        with torch.no_grad():
            xr = rot(x)
            qr = _quantize(xr, scheme)
            back = rot.inverse(qr)
    err_after = float(((x - back).double() ** 2).sum())
    nz, nzr = x != 0, xr != 0
    return {
        "format": scheme.describe(),
        "rotation": rotation_label(rotation),
        "construction": _construction(rot),
        "sqnr_before_db": sqnr_db(signal, err_before),
        "sqnr_after_db": sqnr_db(signal, err_after),
        "gain_db": sqnr_db(signal, err_after) - sqnr_db(signal, err_before),
        "zero_fraction_before": _ratio(float((nz & (q == 0)).sum()), float(nz.sum())),
        "zero_fraction_after": _ratio(float((nzr & (qr == 0)).sum()), float(nzr.sum())),
        "before": outlier_stats(x),
        "after": outlier_stats(xr),
    }
