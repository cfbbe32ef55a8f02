"""Causal attention for bfloat16 on CPU as four batched GEMMs, at flash attention's precision.

Why: under bf16 autocast on a CPU with native bf16 dot products (AVX512-BF16, AMX), torch's SDPA runs its
CPU flash-attention kernel, which takes ~17 ms forward + backward for 8 x 6 heads x 256 x 64 on 2 cores —
as long as its float32 kernel, ~25% of a small GPT's bf16 training step. The same maths as whole-matrix
bf16 GEMMs (oneDNN, ~0.5-1 ms each) plus one softmax takes ~10 ms, and the GPT step ~13% less time.

Precision: Q·Kᵀ and dO·Vᵀ have bf16 inputs, float32 accumulation and float32 outputs (oneDNN's "bf32"
mode on bf16-exact float32 copies: the inputs lose nothing, the products are summed in float32); softmax
and d(scores) = P ∘ (dP - rowsum(dO ∘ O)) are float32; P and d(scores) are rounded to bf16 as the operands
of the P·V, Pᵀ·dO, dS·K and dSᵀ·Q GEMMs, where FlashAttention-2 rounds them too. Against a float64
reference its gradient errors are SDPA's, its output's ~1.3x (torch's CPU kernel keeps P in float32 for P·V):
tests/unit/test_cpu_attention.py. P is kept for backward in bf16 — B·H·T²·2 bytes per layer, O(T²) like
SDPA's math kernel — so above `MAX_SAVED_BYTES` per call SDPA's O(T) kernel runs instead. Score-sized
temporaries (up to 64 MB each) live in per-thread buffers reused across layers and steps
(kernels/workspace.py). d(scores) is one compiled loop (kernels/compiled.py) rather than four eager passes.

Attention dropout (training with `model.dropout` > 0) is applied to P inside the kernel: a keep-mask from
kernels/dropout_mask.py (16 random bits per element, ~6x faster to draw than `bernoulli_`; drop probability p
rounded to a multiple of 2⁻¹⁶) scales the bf16 P into P·V's operand, and is kept for backward as one byte per
score (B·H·T²·3 bytes saved per layer with P). SDPA's CPU path for dropout is its float32 math kernel.

Used by `attn_backend=sdpa` (models/layers/attention_backends.py) for plain causal self-attention (no mask tensor,
query length = key length, GQA allowed) on CPU in bf16 (or under bf16 autocast, which would
cast SDPA's inputs to bf16) while `cpu_kernels=lmforge`;
anything else is torch's SDPA. GPT's attention hands over its fused q|k|v projection output whole
(`packed_gemm_attention`), which saves the copies of splitting it into per-head views first.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from lmforge.kernels import compiled, cpu_kernels, dropout_mask, workspace

MAX_SAVED_BYTES = 256 << 20  # bf16 probabilities (+ the dropout keep-mask) kept for backward, per layer call (B·H·T²·2 or ·3 bytes)

_CAUSAL_BIAS: dict[int, torch.Tensor] = {}  # T -> (T, T) float32: 0 on and below the diagonal, -inf above


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether `gemm_attention` computes this call (see the module doc)."""
    B, H, T, _ = q.shape
    return mask is None and k.size(-2) == T and _runnable((q, k, v), B * H, T, dropout_p)


def packed_usable(qkv: torch.Tensor, n_head: int, dropout_p: float) -> bool:
    """Whether `packed_gemm_attention` computes causal self-attention on this fused (B, T, 3·C) projection output."""
    B, T, _ = qkv.shape
    return _runnable((qkv,), B * n_head, T, dropout_p)


def _runnable(tensors: tuple[torch.Tensor, ...], rows: int, T: int, dropout_p: float) -> bool:
    """What both entry points need: lmforge's CPU kernels on, plain CPU tensors computed in bf16, more than one
    query, P (rows · T² bf16, + a one-byte keep-mask under dropout) within `MAX_SAVED_BYTES`, and no enclosing
    torch.compile."""
    return (
        cpu_kernels.enabled()
        and 0.0 <= dropout_p < 1.0 and T > 1
        and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors) and _runs_in_bf16(*tensors)
        and rows * T * T * (3 if dropout_p else 2) <= MAX_SAVED_BYTES
        and not torch.compiler.is_compiling()
    )


def _runs_in_bf16(*tensors: torch.Tensor) -> bool:
    """bf16 inputs, or float32/bf16 ones under CPU bf16 autocast, which casts SDPA's inputs to bf16 (RoPE in
    float32 hands Llama's q and k over as float32 there)."""
    dtypes = {t.dtype for t in tensors}
    if dtypes == {torch.bfloat16}:
        return True
    return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and dtypes <= {torch.float32, torch.bfloat16})


_FLAG_LOCK = threading.Lock()


@contextlib.contextmanager
def _bf16_products() -> Iterator[None]:
    """float32 matmuls on oneDNN with bf16 products and float32 accumulation (exact for bf16-valued inputs).
    The flag is process-wide: the lock keeps two threads (a threaded server) from interleaving set and restore,
    which could leave it set for every later float32 matmul. A float32 matmul another thread runs during these
    two GEMMs would see it too; this path runs under bf16 only, where threads mixing precisions are not expected."""
    flags = torch.backends.mkldnn.matmul
    with _FLAG_LOCK:
        before = flags.fp32_precision
        flags.fp32_precision = "bf16"
        try:
            yield
        finally:
            flags.fp32_precision = before


def _f32(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """(B, H, T, D) or (B·H, T, D) bf16 (a view is fine) -> contiguous (B·H, T, D) float32 in the scratch buffer
    `name`, one copy: a GEMM operand used at once, so a reused buffer spares a fresh allocation's page faults."""
    buf = workspace.scratch(name, (rows, t.size(-2), t.size(-1)), torch.float32)
    buf.view(t.shape).copy_(t)
    return buf


def _causal_bias(T: int) -> torch.Tensor:
    """Kept per T up to `workspace.MAX_KEPT_BYTES` (T = 4096), built per call beyond."""
    bias = _CAUSAL_BIAS.get(T)
    if bias is None:
        bias = torch.full((T, T), float("-inf"), dtype=torch.float32).triu_(1)  # bf16-true makes bf16 the default dtype
        if T * T * 4 <= workspace.MAX_KEPT_BYTES:
            _CAUSAL_BIAS[T] = bias
    return bias


def _softmax_grad(grad_p: torch.Tensor, probs: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """d(scores) = P ∘ (dP - rowsum(dO ∘ O))·scale in float32, rounded once to bf16 (rowsum(dO ∘ O) =
    rowsum(P ∘ dP): FlashAttention-2's D, from the (T, D) tensors instead of the (T, T) ones). `scale` is a
    0-dim tensor: a Python float would make each head size a recompile of the compiled kernel."""
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    return ((grad_p - delta) * probs.float() * scale).to(torch.bfloat16)


_SOFTMAX_GRAD = compiled.CompiledKernel(_softmax_grad)


def _dropout_probs(probs32: torch.Tensor, keep: torch.Tensor, keep_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 P -> bf16 P (kept for backward) and P·V's operand, the dropped bf16 P (uint8 `keep`), in one pass. The
    dropped P is made from the bf16 P, so backward remakes the very same tensor from what it keeps for Pᵀ·dO."""
    probs = probs32.to(torch.bfloat16)
    return probs, dropout_mask.masked_scale(probs, keep, keep_scale)


def _softmax_grad_dropout(grad_dropped: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor, grad_out: torch.Tensor,
                          out: torch.Tensor, scale: torch.Tensor, keep_scale: torch.Tensor) -> torch.Tensor:
    """`_softmax_grad` behind dropout: d(P) = d(dropped P) ∘ keep / (1 - p); rowsum(dO ∘ O) is still rowsum(P ∘ d(P))."""
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    grad_p = dropout_mask.masked_scale(grad_dropped, keep, keep_scale)  # float32 in, float32 out
    return ((grad_p - delta) * probs.float() * scale).to(torch.bfloat16)


# inductor drops a bf16 round trip (P.to(bf16).float()) unless told to emulate it: forward's dropped P would then
# be rounded from float32 P, backward's remade one from bf16 P, one bf16 unit apart on ~20% of the scores
_ROUNDED = {"emulate_precision_casts": True}
_DROPOUT_PROBS = compiled.CompiledKernel(_dropout_probs, _ROUNDED)
_DROPPED_PROBS = compiled.CompiledKernel(dropout_mask.masked_scale, _ROUNDED)
_SOFTMAX_GRAD_DROPOUT = compiled.CompiledKernel(_softmax_grad_dropout, _ROUNDED)


def _attention_forward(q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, q32: torch.Tensor, k32: torch.Tensor,
                       scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B·H, T, D) bf16 q3/k3/v3 (and float32 copies of q and k) -> bf16 output, probabilities and the dropout
    keep-mask (None without dropout), the last two kept for backward."""
    rows, T, _ = q3.shape
    square = torch.Size((rows, T, T))
    scores, probs32 = workspace.scratch("scores", square, torch.float32), workspace.scratch("probs", square, torch.float32)
    with _bf16_products():
        torch.baddbmm(_causal_bias(T), q32, k32.transpose(1, 2), alpha=scale, out=scores)
    torch.ops.aten._softmax.out(scores, -1, False, out=probs32)  # (torch's kernel beats an inductor-made one here)
    if dropout_p:
        keep = dropout_mask.keep_mask(probs32.shape, dropout_p).view(torch.uint8)  # 1 = kept
        probs, dropped = _DROPOUT_PROBS(probs32, keep, dropout_mask.keep_scale(dropout_p))
        return torch.bmm(dropped, v3), probs, keep
    probs = probs32.to(torch.bfloat16)  # kept for backward: P·V's and Pᵀ·dO's operand, as in FlashAttention-2
    return torch.bmm(probs, v3), probs, None  # bf16 GEMM, float32 accumulation inside


def _attention_backward(q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, out: torch.Tensor, probs: torch.Tensor,
                        keep: torch.Tensor | None, do3: torch.Tensor, scale: float,
                        dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(q), d(k), d(v) as (B·H, T, D) bf16 from the contiguous bf16 d(output) `do3`."""
    rows = q3.size(0)
    keep_scale = dropout_mask.keep_scale(dropout_p) if keep is not None else None
    used = probs if keep is None else _DROPPED_PROBS(probs, keep, keep_scale)  # P·V's operand in forward
    grad_v = torch.bmm(used.transpose(1, 2), do3)  # Pᵀ·dO
    grad_p = workspace.scratch("scores", probs.shape, torch.float32)
    with _bf16_products():
        torch.bmm(_f32(do3, rows, "do32"), _f32(v3, rows, "v32").transpose(1, 2), out=grad_p)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    if keep is None:
        grad_s = _SOFTMAX_GRAD(grad_p, probs, do3, out, scale_t)  # bf16 d(scores), FlashAttention-2's rounding
    else:
        grad_s = _SOFTMAX_GRAD_DROPOUT(grad_p, probs, keep, do3, out, scale_t, keep_scale)
    return torch.bmm(grad_s, k3), torch.bmm(grad_s.transpose(1, 2), q3), grad_v  # dS·K, dSᵀ·Q, Pᵀ·dO


class _GemmAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
        B, H, T, D = q.shape
        rows = B * H
        q3, k3, v3 = (t.reshape(rows, T, D) for t in (q, k, v))
        out, probs, keep = _attention_forward(q3, k3, v3, _f32(q, rows, "q32"), _f32(k, rows, "k32"), scale, dropout_p)
        ctx.save_for_backward(q3, k3, v3, out, probs, keep)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return out.view(B, H, T, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q3, k3, v3, out, probs, keep = ctx.saved_tensors
        shape = grad_out.shape
        do3 = grad_out.reshape(out.shape).to(torch.bfloat16)
        grad_q, grad_k, grad_v = _attention_backward(q3, k3, v3, out, probs, keep, do3, ctx.scale, ctx.dropout_p)
        return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape), None, None


class _PackedGemmAttention(torch.autograd.Function):
    """The same attention on GPT's fused projection output: (B, T, 3·C) q|k|v in, (B, T, C) out. Taking the packed
    tensor (not three strided views of it) lets three copies make q, k and v head-major and contiguous (five
    clones and casts otherwise), and backward write d(qkv) in its layout in one pass (a stack and a permuted copy
    otherwise)."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, n_head: int, dropout_p: float) -> torch.Tensor:
        B, T, width = qkv.shape
        D = width // (3 * n_head)
        rows = B * n_head
        heads = torch.empty(3, B, n_head, T, D, dtype=torch.bfloat16)
        parts = qkv.view(B, T, 3, n_head, D)
        for i in range(3):  # three head-major copies (one 5-D permuted copy is ~2x slower)
            heads[i].copy_(parts[:, :, i].transpose(1, 2))
        q3, k3, v3 = heads.view(3, rows, T, D).unbind(0)
        scale = D**-0.5
        out, probs, keep = _attention_forward(q3, k3, v3, _f32(q3, rows, "q32"), _f32(k3, rows, "k32"), scale, dropout_p)
        ctx.save_for_backward(heads, out, probs, keep)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return out.view(B, n_head, T, D).transpose(1, 2).reshape(B, T, n_head * D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        heads, out, probs, keep = ctx.saved_tensors
        _, B, H, T, D = heads.shape
        q3, k3, v3 = heads.view(3, B * H, T, D).unbind(0)
        do3 = torch.empty(B, H, T, D, dtype=torch.bfloat16)
        do3.copy_(grad_y.view(B, T, H, D).transpose(1, 2))  # head-major and bf16 in one pass
        grads = _attention_backward(q3, k3, v3, out, probs, keep, do3.view(B * H, T, D), ctx.scale, ctx.dropout_p)
        # (B, T, 3, H, D): the fused projection's output layout, written once
        return torch.stack([g.view(B, H, T, D).transpose(1, 2) for g in grads], dim=2).view(B, T, 3 * H * D), None, None


def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(softmax(Q·Kᵀ·scale + causal mask))·V for q (B, H, T, D), k/v (B, H_kv, T, D) with H % H_kv == 0."""
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))  # what autocast does to SDPA's inputs (no-op for bf16)
    group = q.size(1) // k.size(1)
    if group > 1:  # GQA: head h reads key/value head h // group (SDPA's enable_gqa); grads sum back via autograd
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _GemmAttention.apply(q, k, v, q.size(-1) ** -0.5 if scale is None else scale, dropout_p)


def packed_gemm_attention(qkv: torch.Tensor, n_head: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal softmax(Q·Kᵀ/√D)·V of a fused (B, T, 3·C) q|k|v projection output (GPT's layout: q, k, v each head
    by head), as (B, T, C) ready for the output projection."""
    return _PackedGemmAttention.apply(qkv, n_head, dropout_p)
