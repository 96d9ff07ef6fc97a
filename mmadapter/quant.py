"""Weight-only quantised frozen linears: int8 per output channel, 4-bit group-wise, and fp16 weights.

The frozen base's projections can be stored as int8 (one scale per output row) or 4-bit (groups of 32
inputs, a scale and a zero each) and multiplied by PyTorch's own weight-only CPU kernels
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`). Those kernels are fast only with bf16
activations (measured on AVX2 and AVX-512 CPUs: fp32 activations run 5-20x slower than fp32 `F.linear`),
so a few rows (decoding, short prompts) go through them in bf16, while many rows (prefill of long
prompts, training) dequantise one slice of rows at a time and use an ordinary fp32 matmul.

On CPUs without native bf16 (AVX2) those kernels convert activations in software and gain little over fp32,
so a third scheme, "fp16w", stores the weights in fp16 and multiplies fp32 activations with fbgemm's
fp16-weight linear, which converts the weights on the fly (F16C): half of fp32's memory and bytes read per
token, and only fp16 rounding of the weights. It is named fp16w, not fp16, because dtype float16 means fp16
compute.

The 4-bit kernel's packed layout is private to PyTorch and differs between CPU capabilities, so codes
are read back through a layout learnt by round trip in this process (int4_layout.py), and every
quantised base checks one layer of each kind against its dequantised weight when it is built: a
kernel that disagrees is an error naming the capability, never wrong text.

Every quantised module is a drop-in for a frozen `llama.Linear` / `llama.Embedding`: `forward(x)` is
x Wᵀ in x's dtype, `dense_weight()` gives W (dequantised), and gradients flow to the input (never to
the weights) through `_FrozenMatmul`, so adapters, gates, projectors and LoRA terms around them train.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig
from .int4_layout import cpu_capability, layout_for, pack

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4", "fp16w")
DTYPE_CHOICES = ("float32", "bfloat16", "float16", *SCHEMES)  # what --dtype accepts: float dtypes, then the schemes
GROUP_SIZE = 32  # inputs per 4-bit group: GGUF's Q4_0 / Q4_1 block, so those load without requantising
KERNEL_MAX_ROWS = 64  # above this many rows a dequantised fp32 matmul is faster than the bf16 kernels
KERNEL_CHECK_TOLERANCE = 0.01  # kernel vs dequantised weight, relative: bf16 activations and output cost ~0.3%
ROW_CHUNK = 2048  # output rows dequantised at a time on the many-rows path and in backward
_INT4_ROWS = 32  # 4-bit weights need a multiple of 32 output rows (whole kernel blocks on every CPU we checked)


def kernels_available(device: torch.device, scheme: str = "int8") -> bool:
    """True where `scheme` can be used on this device: PyTorch's weight-only int8/int4 kernels (CPU builds); fp16w
    on any CPU (fbgemm's kernel where PyTorch has it, otherwise the converted weight, see `fbgemm_available`)."""
    if scheme == "fp16w":
        return device.type == "cpu"
    ops = torch.ops.aten
    return device.type == "cpu" and hasattr(ops, "_weight_int8pack_mm") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def fbgemm_available(device: torch.device) -> bool:
    """True where fbgemm's fp16-weight linear runs: CPU builds of PyTorch with the fbgemm engine (x86)."""
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | str:
    """The weights' dtype or quantisation scheme to use on `device`; a scheme without kernels there falls
    back to the device's float default with a one-line warning (never an error)."""
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in SCHEMES:
        if not kernels_available(device, dtype):
            log.warning("%s weights need PyTorch's weight-only CPU kernels, not available on %s: using %s instead",
                        dtype, device, str(default).removeprefix("torch."))
            return default
        if dtype == "fp16w" and not fbgemm_available(device):
            log.warning("fp16w: this PyTorch has no fbgemm engine, so every product converts the fp16 weight first "
                        "(same results, no faster than float32)")
        return dtype
    named = getattr(torch, str(dtype), None)
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16, or a quantised base: "
                     f"{', '.join(SCHEMES)}")


class QuantKernelError(RuntimeError):
    """PyTorch's weight-only kernel does not compute what the stored codes say on this CPU."""


class _FrozenMatmul(torch.autograd.Function):
    """y = x Wᵀ with a frozen quantised W: backward gives the input its gradient grad_y W, dequantising W
    one slice of rows at a time (the weight itself never gets a gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        layer: QuantLinear = ctx.layer
        grad_x, start = None, 0
        for weight in layer.weight_slices(grad.dtype):  # [rows, in], in order of output rows
            part = grad[..., start:start + weight.shape[0]] @ weight  # [..., in]
            start += weight.shape[0]
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


class QuantLinear(nn.Module):
    """Shared behaviour of the quantised linears; subclasses store the codes and implement the kernel."""

    in_features: int
    out_features: int
    kernel_dtype: torch.dtype = torch.bfloat16  # the activations `kernel` takes (its output is in the same dtype)
    STORED: str  # the buffer holding the weight's stored form (what an embedding's `weight` shows)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenMatmul.apply(x, self)
        return self.matmul(x)

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        rows = x.numel() // self.in_features
        if rows <= KERNEL_MAX_ROWS:
            y = self.kernel(x.reshape(rows, self.in_features).to(self.kernel_dtype))  # [rows, out]
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        parts = [F.linear(x, weight) for weight in self.weight_slices(x.dtype)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def weight_slices(self, dtype: torch.dtype) -> Iterator[Tensor]:
        """The dequantised weight as consecutive slices of output rows [rows, in], ROW_CHUNK rows each, so a
        many-rows product or the backward pass never holds the whole weight dequantised."""
        for start in range(0, self.out_features, ROW_CHUNK):
            yield self.dequantize(start, min(start + ROW_CHUNK, self.out_features), dtype)

    def dense_weight(self) -> Tensor:
        """The dequantised weight [out, in] in fp32 (a new tensor: the codes stay the stored form)."""
        return self.dequantize(0, self.out_features, torch.float32)

    def kernel(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def check_kernel(self) -> None:
        """Refuse a kernel that disagrees with the dequantised weight (rather than decode wrong text): its
        product on a random input must match F.linear with dense_weight() to 1% (relative norm)."""
        x = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0)).to(self.kernel_dtype)
        ref = F.linear(x.float(), self.dense_weight())  # [3, out]
        err = float((self.kernel(x).float() - ref).norm() / ref.norm().clamp(min=1e-12))
        if not err <= KERNEL_CHECK_TOLERANCE:
            raise QuantKernelError(
                f"PyTorch {torch.__version__}'s {type(self).__name__} kernel disagrees with its own dequantised "
                f"weight on this CPU (kernel capability {cpu_capability()}): relative error {err:.3g}. Use a float "
                f"dtype, or ATEN_CPU_CAPABILITY=avx2 / default, and please report the capability.")

    def dequantize(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantLinear):
    """W ≈ codes * scale, int8 codes [out, in] and one scale per output row (symmetric, absmax / 127)."""

    STORED = "weight_int8"

    def __init__(self, codes: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight_int8", codes)  # [out, in] int8
        self.register_buffer("weight_scale", scales.to(torch.bfloat16))  # [out]: the kernel's dtype

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear:
        return cls(*quantize_int8(weight))

    def kernel(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.weight_scale)

    def dequantize(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        return self.weight_int8[start:end].to(dtype) * self.weight_scale[start:end, None].to(dtype)

    def rows(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """The dequantised rows [*index.shape, in] picked by `index` (an embedding lookup)."""
        return self.weight_int8[index].to(dtype) * self.weight_scale[index, None].to(dtype)


class Int4Linear(QuantLinear):
    """W ≈ (q - 8) * scale + zero per group of 32 inputs, q in 0..15, packed in the CPU kernel's layout.

    That layout is private to PyTorch and differs between CPU capabilities, so reading codes back goes
    through the layout learnt for this process (int4_layout.py), never an assumed one."""

    STORED = "weight_int4"

    def __init__(self, codes: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """codes [out, in] (0..15, any integer dtype); scales, zeros [out, in / GROUP_SIZE]."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.layout = layout_for(self.out_features, self.in_features)
        self.register_buffer("weight_int4", pack(codes))  # [out, in / 2] uint8, the kernel's layout
        # [in / GROUP_SIZE, out, 2]: (scale, zero) per group, transposed as the kernel wants them
        self.register_buffer("weight_scale_zero", torch.stack((scales, zeros), -1).transpose(0, 1)
                             .to(torch.bfloat16).contiguous())

    @classmethod
    def from_float(cls, weight: Tensor) -> Int4Linear:
        return cls(*quantize_int4(weight))

    @staticmethod
    def supports(shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[0] % _INT4_ROWS == 0 and shape[1] % GROUP_SIZE == 0

    def kernel(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4, GROUP_SIZE, self.weight_scale_zero)

    def codes(self, start: int, end: int) -> Tensor:
        """The 4-bit codes [end - start, in] (uint8, 0..15) of output rows start..end."""
        return self.layout.unpack(self.weight_int4, start, end)

    def dequantize(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        sz = self.weight_scale_zero[:, start:end].to(dtype).transpose(0, 1)  # [rows, groups, 2]
        codes = self.codes(start, end).to(dtype).view(end - start, -1, GROUP_SIZE)  # [rows, groups, 32]
        weight = (codes - 8).mul_(sz[..., :1]).add_(sz[..., 1:])  # (q - 8) * scale + zero, per group
        return weight.view(end - start, self.in_features)


class Fp16Linear(QuantLinear):
    """W rounded to fp16 [out, in]; few rows go through fbgemm's fp16-weight linear with fp32 activations.

    Where fbgemm runs (CPU, x86 builds) its packed weight, built here, is the only copy, so the layer holds 2
    bytes per weight: `weight_fp16` is then an empty placeholder (keeping the state-dict key, the device and
    the dtype), `state_dict()` unpacks the weight into that key, loading and `.to()` repack. An embedding's
    layer (`keep_rows`) also keeps the fp16 rows, because a lookup cannot read fbgemm's packed layout.
    Elsewhere (non-x86 builds, other devices) `weight_fp16` holds the weight and the few-rows path multiplies
    by it converted to fp32, which gives the same result."""

    kernel_dtype = torch.float32
    STORED = "weight_fp16"

    def __init__(self, weight: Tensor, keep_rows: bool = False) -> None:
        """weight [out, in], any float dtype; refused when a value does not fit fp16's range."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        largest = float(weight.detach().abs().max()) if weight.numel() else 0.0
        if not largest <= torch.finfo(torch.float16).max:
            raise ValueError(f"a {tuple(weight.shape)} weight holds {largest:.3g}, beyond fp16's range (65504): "
                             "load this base with dtype float32, bfloat16 or int8 instead of fp16w")
        self.keep_rows = keep_rows
        self._packed: Any = None  # fbgemm's packed weight, or None where fbgemm cannot run
        self.register_buffer("weight_fp16", weight.detach().to(torch.float16).contiguous())  # [out, in] or [0]
        self.register_state_dict_post_hook(_save_unpacked)
        self.register_load_state_dict_pre_hook(_unpack_for_loading)
        self.register_load_state_dict_post_hook(_repack_loaded)
        self._pack()

    @classmethod
    def from_float(cls, weight: Tensor) -> Fp16Linear:
        return cls(weight)

    def kernel(self, x: Tensor) -> Tensor:
        """x [rows, in] fp32 -> [rows, out] fp32."""
        packed = self._packed
        if packed is None:
            return F.linear(x, self.weight_fp16.to(x.dtype))
        return torch.ops.quantized.linear_dynamic_fp16(x, packed)

    def _pack(self) -> None:
        """Where fbgemm runs, pack `weight_fp16` for it and (unless rows are kept) leave only the packed copy."""
        weight = self.weight_fp16
        if not fbgemm_available(weight.device):
            self._packed = None
            return
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None)
        if not self.keep_rows:
            self.weight_fp16 = weight.new_empty(0)

    def _packed_only(self) -> bool:
        return self._packed is not None and not self.keep_rows

    def _unpacked(self, dtype: torch.dtype) -> Tensor:
        """The whole weight [out, in] from fbgemm's packed copy, a new tensor (fbgemm unpacks to fp32, exactly
        the fp16 values)."""
        return torch.ops.quantized.linear_unpack_fp16(self._packed)[0].to(dtype)

    def weight_slices(self, dtype: torch.dtype) -> Iterator[Tensor]:
        """From the packed copy, one slice: fbgemm unpacks only the whole weight, so once per call."""
        if self._packed_only():
            yield self._unpacked(dtype)
        else:
            yield from super().weight_slices(dtype)

    def dequantize(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        """Rows start..end [end - start, in]; from the packed copy this unpacks the whole weight (slices of one
        product: `weight_slices`)."""
        if self._packed_only():
            return self._unpacked(dtype)[start:end]
        return self.weight_fp16[start:end].to(dtype)

    def rows(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """The rows [*index.shape, in] picked by `index` (an embedding lookup: build with keep_rows)."""
        weight = self._unpacked(dtype) if self._packed_only() else self.weight_fp16
        return weight[index].to(dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Moves and casts (`.to()`, `.cpu()`, `.float()`) act on the fp16 weight, unpacked first; a move that
        leaves it fp16 on the CPU keeps the packed copy as it is."""
        if self._packed is not None:
            probe = fn(torch.empty(0, dtype=torch.float16))  # where, and as what, the move puts the weight
            if probe.device.type == "cpu" and probe.dtype == torch.float16:
                return super()._apply(fn, recurse)
            if not self.keep_rows:
                self.weight_fp16 = self._unpacked(torch.float16)
            self._packed = None
        module = super()._apply(fn, recurse)
        self._pack()
        return module


def _save_unpacked(module: Fp16Linear, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """state_dict() saves the fp16 weight under `weight_fp16` as ever, not the placeholder."""
    if module._packed_only():
        state[prefix + "weight_fp16"] = module._unpacked(torch.float16)


def _unpack_for_loading(module: Fp16Linear, *_args: Any) -> None:
    """Loading checks the stored shape and writes into the buffer: give it the weight again until repacked."""
    if module._packed_only():
        module.weight_fp16 = module._unpacked(torch.float16)
    module._packed = None


def _repack_loaded(module: Fp16Linear, _keys: Any) -> None:
    module._pack()


class QuantEmbedding(nn.Module):
    """The token embedding as the rows of a frozen int8 or fp16 linear, which is also the tied LM head (`project`)."""

    def __init__(self, head: Int8Linear | Fp16Linear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(head, Fp16Linear) and not head.keep_rows:
            raise ValueError("an fp16 embedding looks rows up, which fbgemm's packed copy cannot give: "
                             "build its layer as Fp16Linear(weight, keep_rows=True)")
        self.head = head
        self.dtype = dtype

    @property
    def weight(self) -> Tensor:
        """The stored rows [vocab, C], int8 codes or fp16 (their device is the model's device)."""
        return getattr(self.head, self.head.STORED)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head.rows(tokens, self.dtype)

    def project(self, h: Tensor) -> Tensor:
        """Logits [..., vocab] from hidden states [..., C]."""
        return self.head(h)

    def dense_weight(self) -> Tensor:
        return self.head.dense_weight()


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: codes [out, in] int8 and scales [out] (fp32), W ≈ codes * scale."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit per group of GROUP_SIZE inputs (min/max): codes [out, in] uint8 in 0..15, scales
    and zeros [out, in / GROUP_SIZE] with W ≈ (codes - 8) * scale + zero, the kernel's convention."""
    out, inp = weight.shape
    w = weight.float().reshape(out, inp // GROUP_SIZE, GROUP_SIZE)
    lo, hi = w.amin(-1), w.amax(-1)  # [out, groups]
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    # store the bf16-rounded scale/zero the kernel will use, and pick zero so code 0 lands on the minimum
    scales = scales.to(torch.bfloat16).float()
    zeros = lo + 8 * scales
    return codes.reshape(out, inp), scales, zeros


# ----------------------------------------------------------------------------------------------
# Building a quantised base


def quantize_linear(source: Tensor | Any, scheme: str) -> nn.Module:
    """The factory: a frozen weight [out, in] (a tensor, or a lazily read GGUF tensor) as a quantised linear.

    GGUF Q4_0 / Q4_1 blocks become int4 without passing through fp32; a shape the 4-bit kernel cannot
    take (out not a multiple of 32, in not of 32) is stored as int8 instead.
    """
    if scheme == "fp16w":
        return Fp16Linear.from_float(_dense(source))
    shape = tuple(source.shape)
    if scheme == "int4" and Int4Linear.supports(shape):
        blocks = getattr(source, "int4_parts", lambda: None)()
        return Int4Linear(*blocks) if blocks is not None else Int4Linear.from_float(_dense(source))
    if scheme == "int4":
        log.warning("a %s weight cannot use the 4-bit kernel (needs multiples of 32): stored as int8", shape)
    return Int8Linear.from_float(_dense(source))


def _dense(source: Tensor | Any) -> Tensor:
    return source if isinstance(source, Tensor) else source.dense()


def build_quantized(model: nn.Module, state: Mapping[str, Any], scheme: str, device: torch.device) -> nn.Module:
    """Fill a meta-device Llama from `state`, one tensor at a time: linear weights through `quantize_linear`,
    the token embedding (also the tied head) and an untied head as int8, norms in fp32. No full-precision
    copy of the model is ever held, so a 4-bit load peaks far below an fp32 one.

    With fp16w the embedding and head are fp16 too: as int8 they would go through the bf16 int8 kernel that
    fp16w exists to avoid, and add int8's rounding to a scheme whose only change is fp16's."""
    from .llama import Embedding, Linear

    def head(weight: Tensor, rows: bool = False) -> Int8Linear | Fp16Linear:
        return Fp16Linear(weight, keep_rows=rows) if scheme == "fp16w" else Int8Linear.from_float(weight)

    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        if isinstance(module, Embedding):
            new: nn.Module = QuantEmbedding(head(_dense(state[f"{name}.weight"]), rows=True))
        elif isinstance(module, Linear):
            source = state[f"{name}.weight"]
            new = head(_dense(source)) if name == "output" else quantize_linear(source, scheme)
        else:
            continue
        setattr(parent, attr, new.to(device))
    checked: set[type] = set()
    for module in model.modules():  # one layer of each kind checks the kernels before any text is made
        if isinstance(module, QuantLinear) and type(module) not in checked:
            module.check_kernel()
            checked.add(type(module))
    for name, _ in list(model.named_parameters()):  # what is left: the norms, kept in fp32
        owner, _, attr = name.rpartition(".")
        tensor = _dense(state[name]).to(device=device, dtype=torch.float32)
        setattr(model.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=False))
    return model


def bytes_per_token(config: LlamaConfig, dtype: torch.dtype | str) -> int:
    """Bytes of weights one decoded token reads: every layer's projections and the LM head (the embedding
    lookup reads one row, the norms are negligible); scales and zeros included for the quantised schemes."""
    layer = (config.dim * config.head_dim * (config.n_heads * 2 + config.n_kv_heads * 2)
             + 3 * config.dim * config.ffn_dim)
    matrices, head = config.n_layers * layer, config.vocab_size * config.dim
    if dtype == "int8":
        rows = config.n_layers * (3 * config.dim + 2 * config.n_kv_heads * config.head_dim + 2 * config.ffn_dim)
        return matrices + head + 2 * (rows + config.vocab_size)  # + one bf16 scale per output row
    if dtype == "int4":
        return matrices // 2 + matrices // GROUP_SIZE * 4 + head + 2 * config.vocab_size
    if dtype == "fp16w":
        return (matrices + head) * 2
    size = torch.empty(0, dtype=dtype).element_size()  # type: ignore[arg-type]
    return (matrices + head) * size
