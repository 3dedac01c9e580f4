"""``RotatedQuantLinear``: the drop-in replacement of an ``nn.Linear`` in a quantized model.

``y = Q_a(x·Rᵀ) · Ŵᵀ + b`` with ``Ŵ = Q_w(W·Rᵀ)`` and ``R`` the layer's online rotation (a normalized Hadamard,
optionally with random signs or block-diagonal). Since ``Rᵀ·R = I`` the product is exact before quantization;
rotating spreads outliers over all channels so both quantizers see flatter distributions.

Two calibrated stages can come with the rotation (``quantization/calibrate``): per-channel smoothing scales ``s`` before it
(``x/s`` online, ``W·diag(s)`` offline: SmoothQuant's migration of outliers from activations into weights, exact
for any architecture because the division rides along with the rotation), and a learned Kronecker transform ``P``
after it (``x·P`` online, ``W·P⁻ᵀ`` offline; orthogonal or affine). The whole input map is
``T(x) = ((x/s)·Rᵀ)·P`` and the stored weight is ``Q_w(W·T⁻ᵀ)``.

The packed weight (codes, scales, zero points, tensor scale of a ``QuantizedTensor``) lives in a ``qweight``
submodule (:class:`PackedWeight`) as registered buffers, under the keys ``QuantizedTensor.state_dict`` uses
(``qweight.payload``, ``qweight.scales``, ...; ``state_dict()`` adds ``qweight.qmeta``), so ``.to(device)``,
``state_dict()`` and ``load_state_dict()`` carry it; ``packed`` is a ``QuantizedTensor`` view of those buffers. A dtype
cast of the module (``.to(torch.float16)``, ``.half()``, ``.double()``) never casts them: they are a storage format,
not floats, and keep their dtypes (a device move still applies).

Two weight modes:

* dense (``weight=`` given, what the pipeline builds for evaluation): ``weight`` is an ``nn.Parameter`` holding the
  dequantized weight (computed from ``packed``), and the forward is ``F.linear(T(x), weight, bias)``;
* packed-only (``weight=None, packed=...``, what a loaded 4-bit model needs): no dense weight is held; the forward
  dequantizes ``packed`` on each call into the compute dtype (``compute_dtype``, else the input's), so the module's
  memory is close to its packed size. ``cache_weight()`` (or ``cache_dequantized=True``) keeps one dequantized copy,
  ``release_weight()`` drops it. ``mod.weight`` still reads (as the dequantized weight).

Both modes use ``packed.dequantize(dtype)``, so in float32 they give the same logits bit for bit.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from hadakit.formats import QuantizedTensor, QuantScheme, fake_quantize
from hadakit.transforms import HadamardRotation
from hadakit.transforms.kronecker import KroneckerTransform


def input_map(x: torch.Tensor, smooth: torch.Tensor | None, rotation, transform: KroneckerTransform | None
              ) -> torch.Tensor:
    """``T(x) = ((x/s)·Rᵀ)·P``: smoothing, rotation and learned transform, each optional."""
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    if rotation is not None:
        x = rotation(x)
    if transform is not None:
        x = transform(x)
    return x


def weight_map(w: torch.Tensor, smooth: torch.Tensor | None, rotation, transform: KroneckerTransform | None
               ) -> torch.Tensor:
    """``W·T⁻ᵀ = ((W·diag(s))·Rᵀ)·P⁻ᵀ`` for a weight ``[out, in]``, so that ``T(x)·(W·T⁻ᵀ)ᵀ = x·Wᵀ``."""
    if smooth is not None:
        w = w * smooth.to(w.dtype)
    if rotation is not None:
        w = rotation(w)
    if transform is not None:
        w = transform.weight_side(w)
    return w


_QMETA = "qmeta"  # the key QuantizedTensor.state_dict stores the metadata under


class PackedWeight(nn.Module):
    """A ``QuantizedTensor`` as registered buffers: ``payload``, ``scales``, [``zero_points``], [``tensor_scale``].

    The non-tensor metadata (``scheme``, ``shape``, original ``dtype``) are plain attributes; ``state_dict()`` adds
    them as ``qmeta`` (uint8 UTF-8 JSON, as ``QuantizedTensor.state_dict`` writes it), so the state dict of this module
    under ``prefix`` is exactly ``self.tensor().state_dict(prefix)`` and ``QuantizedTensor.from_state_dict`` reads it.
    ``load_state_dict`` checks a ``qmeta`` it is given against this module's scheme and shape and refuses buffers of
    another dtype (torch would silently convert them, corrupting the codes).

    Module dtype casts (``.to(dtype)``, ``.half()``, ``.float()``, ``.double()``) leave the buffers' dtypes alone (they
    are a storage format): only the device part of a move applies. ``dequantized(dtype, cache=True)`` keeps one
    dequantized copy, rebuilt whenever a buffer is replaced or modified in place (load, move, edit).
    """

    def __init__(self, packed: QuantizedTensor):
        super().__init__()
        if not isinstance(packed, QuantizedTensor):
            raise TypeError(f"packed must be a QuantizedTensor, got {type(packed).__name__}")
        self.scheme = packed.scheme
        self.shape = packed.shape
        self.dtype = packed.dtype  # the dtype of the tensor that was quantized (informational)
        for k, t in packed._tensors().items():
            self.register_buffer(k, t)
        self._cache: tuple | None = None  # (key, dequantized tensor)

    # --- the QuantizedTensor view --------------------------------------------------------------------------------
    def tensor(self) -> QuantizedTensor:
        """A ``QuantizedTensor`` over the current buffers (no copy)."""
        b = self._buffers
        return QuantizedTensor(b["payload"], b["scales"], self.shape, self.scheme, zero_points=b.get("zero_points"),
                               tensor_scale=b.get("tensor_scale"), dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed buffers (payload + scales + zero points + tensor scale)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)

    def _key(self, dtype: torch.dtype) -> tuple:
        return (dtype,) + tuple((k, t.device, t.data_ptr(), t._version) for k, t in self._buffers.items())

    def dequantized(self, dtype: torch.dtype = torch.float32, *, cache: bool = False) -> torch.Tensor:
        """``self.tensor().dequantize(dtype)``; with ``cache`` the result is kept (one copy) for the next call."""
        if self._cache is not None:
            key = self._key(dtype)
            if self._cache[0] == key:
                return self._cache[1]
            self._cache = None
        w = self.tensor().dequantize(dtype)
        if cache:
            self._cache = (self._key(dtype), w)
        return w

    def release(self) -> None:
        """Drop the cached dequantized copy."""
        self._cache = None

    @property
    def cached(self) -> bool:
        return self._cache is not None

    # --- torch module machinery ----------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        for k, t in list(self._buffers.items()):
            if t is None:
                continue
            try:  # what `fn` does to a tensor of this dtype: a device move, a dtype cast, or both
                probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
                cast, device = probe.dtype != t.dtype, probe.device
            except (RuntimeError, TypeError, NotImplementedError):  # a cast torch cannot do for this dtype
                cast, device = True, fn(torch.empty(0, device=t.device)).device
            if not cast:
                new = fn(t)  # a device move, to_empty, share_memory, ...: as torch does it
            elif t.device.type == "meta":
                new = torch.empty_like(t, device=device)
            else:
                new = t.to(device=device)  # a dtype cast: keep the storage dtype, apply the device
            self._buffers[k] = new
        self._cache = None
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        meta = json.dumps(self.tensor().metadata(), sort_keys=True).encode("utf-8")
        dev = self._buffers["payload"].device
        destination[prefix + _QMETA] = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(
            "cpu" if dev.type == "meta" else dev)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ok = True
        if prefix + _QMETA in state_dict:
            try:
                qt = QuantizedTensor.from_state_dict(state_dict, prefix)
            except (ValueError, KeyError, TypeError) as e:
                error_msgs.append(f"{prefix}{_QMETA}: {e}")
                ok = False
            else:
                if qt.shape != self.shape or qt.scheme.to_dict() != self.scheme.to_dict():
                    error_msgs.append(
                        f"{prefix[:-1] or 'packed weight'}: the state dict holds a {qt.scheme.describe()} tensor of "
                        f"shape {tuple(qt.shape)}, this module a {self.scheme.describe()} tensor of shape "
                        f"{tuple(self.shape)}; build the module from the checkpoint's QuantizedTensor instead")
                    ok = False
                else:
                    self.dtype = qt.dtype
        for k, t in self._buffers.items():
            v = state_dict.get(prefix + k)
            if isinstance(v, torch.Tensor) and t is not None and v.dtype != t.dtype:
                error_msgs.append(f"{prefix}{k}: packed-weight buffer is {t.dtype}, the state dict holds {v.dtype} "
                                  f"(a cast would corrupt the stored codes)")
                ok = False
        if ok:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        if prefix + _QMETA in unexpected_keys:
            unexpected_keys.remove(prefix + _QMETA)
        self._cache = None

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, shape={tuple(self.shape)}, nbytes={self.nbytes}"


class RotatedQuantLinear(nn.Module):
    """``y = Q_a(T(x)) · Ŵᵀ + b``; see the module docstring for the two weight modes.

    ``weight``: the dequantized (transformed) weight ``[out, in]`` — dense mode; ``None`` with ``packed`` given —
    packed-only mode. ``packed``: the ``QuantizedTensor`` of the weight (``None`` for an unquantized weight).
    ``compute_dtype`` (packed-only): the dtype the weight is dequantized to and the matmul runs in (default: the
    input's); the output has the input's dtype. ``cache_dequantized`` (packed-only): keep one dequantized copy.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        packed: QuantizedTensor | None = None,
        rotation: HadamardRotation | None = None,
        act_scheme: QuantScheme | None = None,
        smooth: torch.Tensor | None = None,
        transform: KroneckerTransform | None = None,
        compute_dtype: torch.dtype | None = None,
        cache_dequantized: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if weight is None and packed is None:
            raise ValueError("RotatedQuantLinear needs a weight (dense mode) or a packed QuantizedTensor "
                             "(packed-only mode, weight=None)")
        if packed is not None and tuple(packed.shape) != (out_features, in_features):
            raise ValueError(f"packed weight has shape {tuple(packed.shape)}, expected ({out_features}, "
                             f"{in_features})")
        if weight is not None:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_module("qweight", None if packed is None else PackedWeight(packed))
        self.rotation = rotation
        self.act_scheme = act_scheme
        if smooth is not None and smooth.shape != (in_features,):
            raise ValueError(f"smooth scales must have shape ({in_features},), got {tuple(smooth.shape)}")
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())
        self.transform = transform
        self.compute_dtype = compute_dtype
        self.cache_dequantized = bool(cache_dequantized)
        if self.cache_dequantized and self.packed_only:
            self.cache_weight()

    # --- the packed weight ---------------------------------------------------------------------------------------
    @property
    def packed(self) -> QuantizedTensor | None:
        """The packed weight as a ``QuantizedTensor`` over the ``qweight`` buffers (``None`` if unquantized)."""
        qw = self._modules.get("qweight")
        return None if qw is None else qw.tensor()

    @packed.setter
    def packed(self, value: QuantizedTensor | None) -> None:
        if value is None:
            if self.packed_only:
                raise ValueError("a packed-only RotatedQuantLinear cannot drop its packed weight (it has no other)")
            self.qweight = None
            return
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"packed weight has shape {tuple(value.shape)}, expected ({self.out_features}, "
                             f"{self.in_features})")
        self.qweight = PackedWeight(value)

    @property
    def packed_only(self) -> bool:
        """True when no dense ``weight`` Parameter is held (the forward dequantizes ``packed``)."""
        return self._parameters.get("weight") is None

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight's buffers (0 if unquantized)."""
        qw = self._modules.get("qweight")
        return 0 if qw is None else qw.nbytes

    def state_nbytes(self) -> int:
        """Bytes of every tensor this module holds: parameters, buffers (packed weight included, rotation signs,
        smoothing scales, ...) and the cached dequantized weight if any — its resident weight memory."""
        n = sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))
        qw = self._modules.get("qweight")
        if qw is not None and qw._cache is not None:
            n += qw._cache[1].numel() * qw._cache[1].element_size()
        return n

    def _weight_dtype(self) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None else torch.float32

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``packed.dequantize(dtype)`` (default: ``compute_dtype``, else float32), from the cache when it holds it."""
        qw = self._modules.get("qweight")
        if qw is None:
            raise ValueError("this RotatedQuantLinear has no packed weight")
        return qw.dequantized(dtype or self._weight_dtype(), cache=self.cache_dequantized)

    def cache_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Packed-only mode: keep one dequantized copy of the weight (in ``dtype``, default ``compute_dtype`` or
        float32; rebuilt by the forward if the input asks for another dtype). A no-op in dense mode."""
        self.cache_dequantized = True
        if not self.packed_only:
            return None
        return self.dequantized_weight(dtype)

    def release_weight(self) -> None:
        """Drop the cached dequantized weight and stop caching (packed-only mode: back to packed-size memory)."""
        self.cache_dequantized = False
        qw = self._modules.get("qweight")
        if qw is not None:
            qw.release()

    def to_packed_only(self) -> "RotatedQuantLinear":
        """Drop the dense ``weight`` Parameter: the forward dequantizes ``packed`` from now on."""
        if self._modules.get("qweight") is None:
            raise ValueError("this RotatedQuantLinear has no packed weight to run from")
        if "weight" in self._parameters:
            del self.weight
        if self.cache_dequantized:
            self.cache_weight()
        return self

    def __getattr__(self, name: str):
        # Packed-only mode: `mod.weight` reads as the dequantized weight (other code reads it).
        if name == "weight":
            d = self.__dict__
            if d.get("_parameters", {}).get("weight") is None and d.get("_modules", {}).get("qweight") is not None:
                return self.dequantized_weight()
        return super().__getattr__(name)

    # --- forward -------------------------------------------------------------------------------------------------
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``T(x)``: smoothing, rotation and learned transform, before the activation quantizer."""
        return input_map(x, self.smooth, self.rotation, self.transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        if self.act_scheme is not None:
            x = fake_quantize(x, self.act_scheme)
        w = self._parameters.get("weight")
        if w is not None:
            return F.linear(x, w, self.bias)
        out_dtype = x.dtype
        dt = self.compute_dtype if self.compute_dtype is not None else x.dtype
        w = self.qweight.dequantized(dt, cache=self.cache_dequantized)
        b = None if self.bias is None else self.bias.to(dt)
        y = F.linear(x.to(dt), w, b)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}"]
        qw = self._modules.get("qweight")
        if qw is not None:
            parts.append(f"weight={qw.scheme.describe()}" + (" packed-only" if self.packed_only else ""))
        if self.act_scheme is not None:
            parts.append(f"act={self.act_scheme.describe()}")
        if self.rotation is not None:
            parts.append(f"rotation={self.rotation.construction} signs={self.rotation.sign_mode}")
        if self.smooth is not None:
            parts.append("smooth")
        if self.transform is not None:
            parts.append(f"transform={self.transform.mode} {self.transform.split[0]}x{self.transform.split[1]}")
        return ", ".join(parts)
