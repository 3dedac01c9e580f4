"""Bridges from the formats layer to the weight quantizers of the model pipeline."""

from __future__ import annotations

import torch

from hadakit.formats import GroupScales, QuantizedTensor, QuantScheme, compute_scales, pack_codes, quantize_with_scales


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

    def fit(self, w: torch.Tensor) -> GroupScales:
        return compute_scales(w, self.col_scheme, tensor_scale=self.tensor_scale)

    def quantize_column(self, col: torch.Tensor, params: GroupScales, column: int) -> torch.Tensor:
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
