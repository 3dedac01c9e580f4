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
            grp = column // self.group_size
            self._scale_codes[grp] = params.scale_codes
            self._zero_points[grp] = params.zero_points
            return values
        codes, values = quantize_with_scales(col[:, None], self.col_scheme, params)
        self.codes[:, column] = codes[:, 0]
        grp = column // self.group_size
        self._scale_codes[grp] = params.scale_codes
        self._zero_points[grp] = params.zero_points
        return values[:, 0]

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
