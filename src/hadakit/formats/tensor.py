"""QuantizedTensor: the real storage of a quantized tensor, and its safetensors (de)serialization.

Layout (what a fused rotate+quantize kernel must produce to build one):

* ``payload`` — uint8, 1-D, ``ceil(numel · bits / 8)`` bytes: the element codes in row-major order of ``shape``,
  packed as an LSB-first bit stream (:mod:`hadakit.formats.packing`). Codes: two's complement for symmetric INT and
  ternary, unsigned for asymmetric INT, the bit pattern for float formats, 1 = +1 for binary.
* ``scales`` — the scale codes in the scale format's storage dtype (``torch.float8_e8m0fnu`` for E8M0,
  ``torch.float8_e4m3fn`` for UE4M3, uint8 for UE5M3, float16 / bfloat16 / float32), shape ``()`` for
  ``per_tensor``, ``(*leading, 1)`` for ``per_row`` and ``(*leading, last // group_size)`` for ``group``.
* ``zero_points`` — uint8, same shape as ``scales`` (asymmetric INT only).
* ``tensor_scale`` — 0-d float32 (two-level schemes such as NVFP4 only).

A checkpoint stores these tensors under ``<prefix>payload``, ``<prefix>scales``, ``<prefix>zero_points``,
``<prefix>tensor_scale`` plus ``<prefix>qmeta`` (uint8 UTF-8 JSON: shape, original dtype, scheme), so a state dict is a
plain ``dict[str, Tensor]`` that safetensors or ``torch.save`` can hold.
"""

from __future__ import annotations

import json
from typing import Mapping

import torch

from .packing import packed_nbytes, unpack_codes
from .schemes import QuantScheme

__all__ = ["QuantizedTensor", "load_quantized", "save_quantized"]

_META_KEY = "qmeta"
_FORMAT_VERSION = 1


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# The dtypes a checkpoint may name as the quantized tensor's original dtype: those quantize() accepts. Resolved from
# this table, never with getattr on torch (a name such as "nn" or "Tensor" would resolve to anything).
_META_DTYPES = {_dtype_name(dt): dt for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _read_meta(t: torch.Tensor, key: str) -> dict:
    """The JSON object stored under ``key`` (uint8 UTF-8), with a named error for anything else."""
    corrupt = f"quantized-tensor metadata {key!r} is corrupt"
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{corrupt}: expected a 1-D uint8 tensor of UTF-8 JSON, got {got}. Re-save the checkpoint.")
    raw = bytes(t.detach().cpu().numpy().tobytes())
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{corrupt}: not UTF-8 JSON ({e}; first bytes {raw[:32]!r}). Re-save the checkpoint.") \
            from None
    if not isinstance(meta, dict):
        raise ValueError(f"{corrupt}: expected a JSON object, got a JSON {type(meta).__name__}. "
                         f"Re-save the checkpoint.")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{key!r}: unsupported quantized-tensor format version {meta.get('version')!r} "
                         f"(this hadakit reads version {_FORMAT_VERSION})")
    missing = [f for f in ("shape", "dtype", "scheme") if f not in meta]
    if missing:
        raise ValueError(f"{corrupt}: missing field(s) {', '.join(missing)}. Re-save the checkpoint.")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"{corrupt}: shape must be a list of non-negative integers, got {shape!r}.")
    if not isinstance(meta["scheme"], dict):
        raise ValueError(f"{corrupt}: scheme must be a JSON object, got {meta['scheme']!r}.")
    if meta["dtype"] not in _META_DTYPES:
        raise ValueError(f"{corrupt}: dtype {meta['dtype']!r} is not one of {', '.join(_META_DTYPES)} "
                         f"(the dtypes a quantized tensor is made from).")
    return meta


class QuantizedTensor:
    """A tensor stored as packed element codes + scales (+ zero points, + tensor scale). Not a torch.Tensor.

    Build one with :func:`hadakit.formats.quantize`; get floats back with :meth:`dequantize`.
    """

    def __init__(self, payload: torch.Tensor, scales: torch.Tensor, shape, scheme: QuantScheme, *,
                 zero_points: torch.Tensor | None = None, tensor_scale: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        self.shape = torch.Size(shape)
        self.scheme = scheme
        self.dtype = dtype  # the dtype of the tensor that was quantized (informational)
        _, sshape = scheme.layout(self.shape)
        numel = self.shape.numel()
        bits = scheme.element.bits
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != packed_nbytes(numel, bits):
            raise ValueError(
                f"payload must be a 1-D uint8 tensor of {packed_nbytes(numel, bits)} bytes ({numel} codes x {bits} "
                f"bits), got {payload.dtype} of shape {tuple(payload.shape)}")
        sdt = scheme.scale_format.storage_dtype
        if scales.dtype != sdt or tuple(scales.shape) != sshape:
            raise ValueError(f"scales must be {sdt} of shape {sshape}, got {scales.dtype} {tuple(scales.shape)}")
        if (zero_points is not None) != (not scheme.symmetric):
            raise ValueError("zero_points are required for asymmetric schemes and only for them")
        if zero_points is not None and (zero_points.dtype != torch.uint8 or tuple(zero_points.shape) != sshape):
            raise ValueError(f"zero_points must be uint8 of shape {sshape}")
        if (tensor_scale is not None) != scheme.tensor_scale:
            raise ValueError("tensor_scale is required for two-level schemes (scheme.tensor_scale) and only for them")
        if tensor_scale is not None and (tensor_scale.dtype != torch.float32 or tensor_scale.dim() != 0):
            raise ValueError("tensor_scale must be a 0-d float32 tensor")
        self.payload = payload
        self.scales = scales
        self.zero_points = zero_points
        self.tensor_scale = tensor_scale

    # --- basic properties ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.payload.device

    def numel(self) -> int:
        return self.shape.numel()

    def _tensors(self) -> dict[str, torch.Tensor]:
        d = {"payload": self.payload, "scales": self.scales}
        if self.zero_points is not None:
            d["zero_points"] = self.zero_points
        if self.tensor_scale is not None:
            d["tensor_scale"] = self.tensor_scale
        return d

    @property
    def nbytes(self) -> int:
        """Bytes of payload + scales + zero points + tensor scale (the JSON metadata is not counted)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @property
    def bits_per_element(self) -> float:
        """Exact storage cost: ``8 · nbytes / numel`` (e.g. mxfp4: 4.25; nvfp4: 4.5 + 32 / numel)."""
        n = self.numel()
        return 8.0 * self.nbytes / n if n else 0.0

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, scheme={self.scheme.describe()!r}, "
                f"bits_per_element={self.bits_per_element:.4g}, device={self.device})")

    # --- decoding ------------------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The element codes, unpacked: uint8 tensor of ``shape``."""
        return unpack_codes(self.payload, self.scheme.element.bits, self.numel()).reshape(self.shape)

    def scale_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decoded scales (level 1 only; multiply by ``tensor_scale`` for the effective scale)."""
        sf = self.scheme.scale_format
        return sf.decode(sf.storage_to_codes(self.scales), dtype).reshape(self.scales.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Floats from the stored bits: ``v · s`` per element, computed in float32 (float64 if ``dtype`` is)."""
        scheme = self.scheme
        el, sf = scheme.element, scheme.scale_format
        (R, G, g), _ = scheme.layout(self.shape)
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        codes = unpack_codes(self.payload, el.bits, self.numel()).reshape(R, G, g)
        if self.zero_points is not None:
            v = codes.to(cd) - self.zero_points.reshape(R, G).to(cd)[..., None]
        else:
            v = el.decode(codes, cd, signed=True)
        s = sf.decode(sf.storage_to_codes(self.scales).reshape(R, G), cd)
        if self.tensor_scale is not None:
            s = s * self.tensor_scale.to(cd)
        return (v * s[..., None]).reshape(self.shape).to(dtype)

    def native_payload(self) -> torch.Tensor | None:
        """The payload viewed as a torch float8 tensor of ``shape`` for E4M3 / E5M2 elements, else ``None``."""
        el = self.scheme.element
        if el.kind == "float" and el.bits == 8 and el.storage_dtype != torch.uint8:
            return self.payload.view(el.storage_dtype).reshape(self.shape)
        return None

    # --- movement ------------------------------------------------------------------------------------------------
    def to(self, device) -> "QuantizedTensor":
        """A copy with every stored tensor on ``device``."""
        t = {k: v.to(device) for k, v in self._tensors().items()}
        return QuantizedTensor(t["payload"], t["scales"], self.shape, self.scheme, zero_points=t.get("zero_points"),
                               tensor_scale=t.get("tensor_scale"), dtype=self.dtype)

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    # --- serialization -------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"version": _FORMAT_VERSION, "shape": list(self.shape), "dtype": _dtype_name(self.dtype),
                "scheme": self.scheme.to_dict()}

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under ``prefix + name`` (payload, scales, [zero_points], [tensor_scale], qmeta); pass
        ``prefix="layer.weight."`` to store many quantized tensors in one checkpoint."""
        d = {prefix + k: v.contiguous() for k, v in self._tensors().items()}
        meta = json.dumps(self.metadata(), sort_keys=True).encode("utf-8")
        d[prefix + _META_KEY] = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(self.device)
        return d

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                        device=None) -> "QuantizedTensor":
        """Inverse of :meth:`state_dict`."""
        key = prefix + _META_KEY
        if key not in state_dict:
            raise KeyError(f"no quantized tensor under prefix {prefix!r} (missing {key!r})")
        meta = _read_meta(state_dict[key], key)
        scheme = QuantScheme.from_dict(meta["scheme"])

        def get(name):
            t = state_dict.get(prefix + name)
            return t.to(device) if (t is not None and device is not None) else t

        return cls(get("payload"), get("scales"), meta["shape"], scheme, zero_points=get("zero_points"),
                   tensor_scale=get("tensor_scale"), dtype=_META_DTYPES[meta["dtype"]])

    def save(self, path, metadata: Mapping[str, str] | None = None) -> None:
        """Write this tensor to a safetensors file (the scheme also goes in the header metadata, for humans)."""
        save_quantized(path, {"": self}, metadata=metadata)

    @classmethod
    def load(cls, path, device="cpu") -> "QuantizedTensor":
        """Read a file written by :meth:`save` (bit-exact)."""
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path), device=str(device)))


def _prefix(name: str) -> str:
    return name + "." if name else ""


def save_quantized(path, tensors: Mapping[str, "QuantizedTensor | torch.Tensor"],
                   metadata: Mapping[str, str] | None = None) -> None:
    """Save quantized and plain tensors in one safetensors file.

    ``QuantizedTensor`` ``name`` is stored under ``name.payload``, ``name.scales``, ... (``name.qmeta`` marks it);
    plain tensors under their name. Header metadata: ``metadata`` plus ``hadakit.quantized`` (JSON of the schemes).
    """
    from safetensors.torch import save_file

    sd: dict[str, torch.Tensor] = {}
    info = {}
    for name, t in tensors.items():
        if isinstance(t, QuantizedTensor):
            part = t.state_dict(_prefix(name))
            info[name] = t.scheme.describe()
        elif isinstance(t, torch.Tensor):
            part = {name: t.contiguous()}
        else:
            raise TypeError(f"{name!r}: expected a QuantizedTensor or torch.Tensor, got {type(t).__name__}")
        clash = set(part) & set(sd)
        if clash:
            raise ValueError(f"duplicate keys {sorted(clash)}")
        sd.update(part)
    meta = dict(metadata or {})
    meta["hadakit.quantized"] = json.dumps(info, sort_keys=True)
    save_file({k: v.detach().cpu() for k, v in sd.items()}, str(path), metadata=meta)


def load_quantized(path, device="cpu") -> dict[str, "QuantizedTensor | torch.Tensor"]:
    """Load a file written by :func:`save_quantized`: ``{name: QuantizedTensor or Tensor}``."""
    from safetensors.torch import load_file

    sd = load_file(str(path), device=str(device))
    out: dict = {}
    used: set[str] = set()
    for key in sorted(sd):
        if key == _META_KEY or key.endswith("." + _META_KEY):
            name = key[: -len(_META_KEY) - 1] if key != _META_KEY else ""
            qt = QuantizedTensor.from_state_dict(sd, _prefix(name))
            out[name] = qt
            used.update(_prefix(name) + k for k in list(qt._tensors()) + [_META_KEY])
    for key, t in sd.items():
        if key not in used:
            out[key] = t
    return out
