"""Bridges from the formats layer to the weight quantizers of the model pipeline."""

from __future__ import annotations

import torch

from hadakit.formats import GroupScales, QuantizedTensor, QuantScheme, compute_scales, pack_codes, quantize_with_scales
from hadakit.formats.elements import IntFormat


class SchemeGroupQuantizer:
    """GPTQ's ``GroupQuantizer`` for any ``QuantScheme``: fits a group's scales with the formats layer, quantizes
    columns against them, and records codes and scale codes so the result packs into a ``QuantizedTensor`` that
    dequantizes to exactly the values GPTQ chose.

    ``w`` (the full ``[out, in]`` weight) fixes the layout and, for two-level schemes (NVFP4), the fp32 tensor scale.
    """

    def __init__(self, scheme: QuantScheme, w: torch.Tensor):
        self.scheme = scheme
        self.shape = tuple(w.shape)
        out, n = self.shape
        if scheme.granularity == "group":
            self.group_size = scheme.group_size
            self.col_scheme = scheme.replace(granularity="per_row", group_size=None)
        elif scheme.granularity == "per_row":
            self.group_size = n
            self.col_scheme = scheme
        else:  # per_tensor: one "group" is the whole matrix
            self.group_size = n
            self.col_scheme = scheme
        self.tensor_scale = compute_scales(w.float(), scheme).tensor_scale if scheme.tensor_scale else None
        self.codes = torch.zeros(self.shape, dtype=torch.int64, device=w.device)
        n_groups = n // self.group_size
        self._scale_codes: list[torch.Tensor | None] = [None] * n_groups
        self._zero_points: list[torch.Tensor | None] = [None] * n_groups
        self._s_eff: list[torch.Tensor | None] = [None] * n_groups

        # GPTQ quantizes thousands of columns one at a time; for integer grids with nearest rounding the generic
        # path's checks and dispatch cost more than the arithmetic, so those columns take a direct route that
        # computes exactly what quantize_with_scales does (tested bit for bit).
        el = scheme.element
        self._int_fast = (isinstance(el, IntFormat) and not el.frac_bits and scheme.rounding == "nearest"
                          and w.dtype == torch.float32)
        if self._int_fast:
            if scheme.symmetric:
                self._lo, self._hi = -el.qmax - (scheme.int_range == "full"), el.qmax
            else:
                self._lo, self._hi = 0, el.umax
        self._fast_params: tuple | None = None  # (params, divisor, scale, zero point) of the current group

    def fit(self, w: torch.Tensor) -> GroupScales:
        return compute_scales(w, self.col_scheme, tensor_scale=self.tensor_scale)

    def _int_column(self, col: torch.Tensor, params: GroupScales) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._fast_params
        if cached is None or cached[0] is not params:
            s_eff = params.s_eff.reshape(-1)
            dead = ~(s_eff > 0)
            s_div = torch.where(dead, torch.ones_like(s_eff), s_eff)
            zp = params.zero_points.reshape(-1) if params.zero_points is not None else None
            cached = self._fast_params = (params, s_div, s_eff, zp, dead)
        _, s_div, s_eff, zp, dead = cached
        t = torch.where(dead, torch.zeros_like(col), col / s_div)
        r = torch.round(t)
        if zp is None:
            r = r.clamp_(self._lo, self._hi)
            return self.scheme.element.encode(r, signed=True), (r + 0.0) * s_eff
        r = (r + zp).clamp_(self._lo, self._hi)
        return r.to(torch.int64), (r - zp) * s_eff

    def quantize_column(self, col: torch.Tensor, params: GroupScales, column: int) -> torch.Tensor:
        if self._int_fast and col.dtype == torch.float32:
            codes, values = self._int_column(col, params)
            self.codes[:, column] = codes
            self._record(column, params)
            return values
        codes, values = quantize_with_scales(col[:, None], self.col_scheme, params)
        self.codes[:, column] = codes[:, 0]
        self._record(column, params)
        return values[:, 0]

    def _record(self, column: int, params: GroupScales) -> None:
        grp = column // self.group_size
        self._scale_codes[grp] = params.scale_codes
        self._zero_points[grp] = params.zero_points
        self._s_eff[grp] = params.s_eff

    def refit_scales(self, w: torch.Tensor, h: torch.Tensor) -> list[GroupScales] | None:
        """Least-squares group scales for the recorded codes: per row, the scales ``s`` minimizing
        ``(w − Σ_g s_g·v_g)·H·(w − Σ_g s_g·v_g)ᵀ`` (``v_g`` the row's element values in group ``g``), rounded to the
        scale format. Rows where the rounded scales do not lower that error keep their old ones. ``None`` for an
        asymmetric scheme (its zero points would need refitting too) or a per-tensor one (one scale for all rows)."""
        if not self.scheme.symmetric or self.scheme.granularity not in ("group", "per_row") \
                or any(s is None for s in self._s_eff):
            return None
        out, n = self.shape
        g = self.group_size
        n_groups = n // g
        h = h.to(torch.float64)
        w = w.to(torch.float64)
        v = self.scheme.element.decode(self.codes, torch.float64, signed=True)  # element values, unscaled
        s_old = torch.cat([s.reshape(-1, 1) for s in self._s_eff], dim=1).to(torch.float64)  # [out, G]
        a = torch.empty(out, n_groups, n_groups, dtype=torch.float64, device=w.device)
        for i in range(n_groups):
            p = v[:, i * g:(i + 1) * g] @ h[i * g:(i + 1) * g]  # [out, n]
            a[:, i] = (p * v).reshape(out, n_groups, g).sum(-1)
        b = ((w @ h) * v).reshape(out, n_groups, g).sum(-1)
        # Groups whose codes are all zero have no say: a unit diagonal keeps the system regular, their scale kept.
        empty = torch.diagonal(a, dim1=1, dim2=2) <= 0
        a = a + torch.diag_embed(empty.to(a.dtype))
        b = torch.where(empty, s_old, b)
        s_new = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
        s_new = torch.where(empty | ~(s_new > 0), s_old, s_new)

        sf = self.scheme.scale_format
        st = self.tensor_scale.to(torch.float64) if self.tensor_scale is not None else None
        _, codes = sf.cast((s_new / st if st is not None else s_new).to(torch.float32))
        s_dec = sf.decode(codes, torch.float64)
        s_dec = s_dec * st if st is not None else s_dec

        def err(s):
            e = w - v * s.repeat_interleave(g, dim=1)
            return ((e @ h) * e).sum(-1)

        better = err(s_dec) < err(s_old)
        old_codes = torch.cat([c.reshape(-1, 1) for c in self._scale_codes], dim=1)
        codes = torch.where(better[:, None], codes, old_codes)
        s_eff = torch.where(better[:, None], s_dec, s_old).to(torch.float32)
        ts = self.tensor_scale
        return [GroupScales(codes[:, i:i + 1], s_eff[:, i:i + 1], None, ts) for i in range(n_groups)]

    def packed(self) -> QuantizedTensor:
        """The quantized weight in real storage (all groups must have been quantized)."""
        if any(s is None for s in self._scale_codes):
            raise RuntimeError("packed(): some groups were never quantized")
        sf = self.scheme.scale_format
        _, sshape = self.scheme.layout(self.shape)
        sc = torch.cat([s.reshape(-1, 1) for s in self._scale_codes], dim=1)
        scales = sf.codes_to_storage(sc).reshape(sshape).contiguous()
        zps = None
        if not self.scheme.symmetric:
            zps = torch.cat([z.reshape(-1, 1) for z in self._zero_points], dim=1).to(torch.uint8).reshape(sshape)
        payload = pack_codes(self.codes.reshape(-1), self.scheme.element.bits)
        return QuantizedTensor(payload, scales, self.shape, self.scheme, zero_points=zps,
                               tensor_scale=self.tensor_scale, dtype=torch.float32)
