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
tests/unit/test_cpu_attention.py. P is kept for backward in bf16 — up to B·H·T²·2 bytes per layer, O(T²) like
SDPA's math kernel — so above `MAX_SAVED_BYTES` per call SDPA's O(T) kernel runs instead. Score-sized
temporaries (up to 64 MB each) live in per-thread buffers reused across layers and steps
(kernels/workspace.py). d(scores) is one compiled loop (kernels/compiled.py) rather than four eager passes.

Causal blocks: the queries go in blocks of up to `BLOCK_ROWS` (128) rows, and a block's scores stop at its last
row's key, so the GEMMs and the softmax skip the masked triangle above the diagonal blocks: 3/4 of the work at
T = 256, 9/16 at T = 1024. Measured on 2 Zen 4 cores, forward + backward of 8 x 6 heads x 64 per layer: T = 256
20.7 -> 16.7 ms, T = 512 (batch 4) 38.5 -> 28.0 ms, T = 1024 (batch 2) 76.9 -> 45.3 ms. Each block's operands are
contiguous copies (a GEMM copies a strided row block itself, into a fresh allocation); the earlier blocks' parts of
d(k) and d(v) are added to the last block's (one more bf16 rounding on those rows, within the test's 1.5x of SDPA's
error).

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


def _operand(t: torch.Tensor, name: str, rows: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The first `rows` rows (default all) of every (T, D) matrix of a contiguous (N, T, D) `t`, contiguous and in
    `dtype` (default t's): `t` itself when that is all of it as it is, else one copy into the scratch buffer
    `name`. A GEMM operand used at once: a GEMM would copy a strided view itself, and a reused buffer spares a
    fresh allocation's page faults."""
    rows, dtype = t.size(1) if rows is None else rows, dtype or t.dtype
    if rows == t.size(1) and dtype == t.dtype:
        return t
    buf = workspace.scratch(name, (t.size(0), rows, t.size(2)), dtype)
    buf.copy_(t[:, :rows])
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


BLOCK_ROWS = 128  # query rows per block: a block's keys stop at its last row, so the masked triangle above is skipped


def query_blocks(T: int) -> list[tuple[int, int]]:
    """Equal query-row blocks (start, end) of at most ~`BLOCK_ROWS` rows. Block b attends to keys [0, end_b) only:
    the scores past it are masked for all its rows, so the GEMMs and the softmax skip them. At T = 256 that is 2
    blocks and 3/4 of the work (measured: P·V 1.02 against 1.29 ms); at T = 1024, 8 blocks and 9/16."""
    n = -(-T // BLOCK_ROWS)
    edges = [T * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _attention_forward(q_blocks: list[torch.Tensor], k3: torch.Tensor, v3: torch.Tensor, scale: float,
                       dropout_p: float) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Contiguous bf16 query blocks (B·H, rows, D) (`query_blocks`) and keys/values (B·H, T, D) -> each block's bf16
    output and probabilities (B·H, rows, end), and the dropout keep-mask (B·H, T, T) (None without dropout); the
    last two are kept for backward."""
    rows, T, _ = k3.shape
    bias = _causal_bias(T)
    keep = dropout_mask.keep_mask((rows, T, T), dropout_p).view(torch.uint8) if dropout_p else None  # 1 = kept
    k32 = _operand(k3, "k32", dtype=torch.float32)
    outs, probs_kept = [], []
    for i, ((r0, r1), q_b) in enumerate(zip(query_blocks(T), q_blocks, strict=True)):
        square = torch.Size((rows, r1 - r0, r1))
        scores, probs32 = workspace.scratch(f"scores{i}", square, torch.float32), workspace.scratch(f"probs{i}", square, torch.float32)
        with _bf16_products():
            torch.baddbmm(bias[r0:r1, :r1], _operand(q_b, "q32", dtype=torch.float32), _operand(k32, "k32_prefix", r1).transpose(1, 2),
                          alpha=scale, out=scores)
        torch.ops.aten._softmax.out(scores, -1, False, out=probs32)  # (torch's kernel beats an inductor-made one here)
        if keep is not None:
            probs, used = _DROPOUT_PROBS(probs32, keep[:, r0:r1, :r1], dropout_mask.keep_scale(dropout_p))
        else:
            probs = used = probs32.to(torch.bfloat16)  # kept for backward: P·V's and Pᵀ·dO's operand, as in FlashAttention-2
        probs_kept.append(probs)
        outs.append(torch.bmm(used, _operand(v3, "v_prefix", r1)))  # bf16 GEMM, float32 accumulation inside
    return outs, probs_kept, keep


def _attention_backward(q_blocks: list[torch.Tensor], k3: torch.Tensor, v3: torch.Tensor, outs: list[torch.Tensor],
                        probs_kept: list[torch.Tensor], keep: torch.Tensor | None, do_blocks: list[torch.Tensor], scale: float,
                        dropout_p: float) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each query block's d(q) and the whole d(k), d(v) (B·H, T, D), bf16, from the blocks' contiguous bf16
    d(output). The last block's keys are all of them, so it writes d(k) and d(v); each earlier block adds its
    part to their first rows (one more bf16 rounding there: FlashAttention-2 sums in float32)."""
    T = k3.size(1)
    keep_scale = dropout_mask.keep_scale(dropout_p) if keep is not None else None
    scale_t = torch.tensor(scale, dtype=torch.float32)
    blocks = query_blocks(T)
    v32 = _operand(v3, "v32", dtype=torch.float32)
    grad_qs: list[torch.Tensor] = [torch.empty(0)] * len(blocks)
    grad_k = grad_v = torch.empty(0)
    for i in reversed(range(len(blocks))):
        (r0, r1), probs, do_b, q_b = blocks[i], probs_kept[i], do_blocks[i], q_blocks[i]
        keep_b = None if keep is None else keep[:, r0:r1, :r1]
        used = probs if keep_b is None else _DROPPED_PROBS(probs, keep_b, keep_scale)  # P·V's operand in forward
        part_v = torch.bmm(used.transpose(1, 2), do_b)  # Pᵀ·dO
        grad_p = workspace.scratch(f"scores{i}", probs.shape, torch.float32)
        with _bf16_products():
            torch.bmm(_operand(do_b, "do32", dtype=torch.float32), _operand(v32, "v32_prefix", r1).transpose(1, 2), out=grad_p)
        if keep_b is None:
            grad_s = _SOFTMAX_GRAD(grad_p, probs, do_b, outs[i], scale_t)  # bf16 d(scores), FlashAttention-2's rounding
        else:
            grad_s = _SOFTMAX_GRAD_DROPOUT(grad_p, probs, keep_b, do_b, outs[i], scale_t, keep_scale)
        grad_qs[i] = torch.bmm(grad_s, _operand(k3, "k_prefix", r1))  # dS·K
        part_k = torch.bmm(grad_s.transpose(1, 2), q_b)  # dSᵀ·Q
        if r1 == T:
            grad_k, grad_v = part_k, part_v
        else:
            grad_k[:, :r1] += part_k
            grad_v[:, :r1] += part_v
    return grad_qs, grad_k, grad_v


def _split_rows(t: torch.Tensor, T: int) -> list[torch.Tensor]:
    """(..., T, D) -> each query block's rows as a contiguous bf16 (N, rows, D), N = the product of the leading dims."""
    return [t[..., r0:r1, :].to(torch.bfloat16).reshape(-1, r1 - r0, t.size(-1)).contiguous() for r0, r1 in query_blocks(T)]


class _GemmAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
        B, H, T, D = q.shape
        rows = B * H
        q_blocks = _split_rows(q, T)
        k3, v3 = (t.reshape(rows, T, D).contiguous() for t in (k, v))
        outs, probs, keep = _attention_forward(q_blocks, k3, v3, scale, dropout_p)
        ctx.save_for_backward(k3, v3, keep, *q_blocks, *outs, *probs)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return torch.cat(outs, dim=1).view(B, H, T, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        k3, v3, keep, *rest = ctx.saved_tensors
        n = len(rest) // 3
        q_blocks, outs, probs = rest[:n], rest[n:2 * n], rest[2 * n:]
        shape = grad_out.shape
        grad_qs, grad_k, grad_v = _attention_backward(q_blocks, k3, v3, outs, probs, keep, _split_rows(grad_out, shape[-2]),
                                                      ctx.scale, ctx.dropout_p)
        return torch.cat(grad_qs, dim=1).view(shape), grad_k.view(shape), grad_v.view(shape), None, None


class _PackedGemmAttention(torch.autograd.Function):
    """The same attention on GPT's fused projection output: (B, T, 3·C) q|k|v in, (B, T, C) out. Taking the packed
    tensor (not three strided views of it) lets single copies make the query blocks, k and v head-major and
    contiguous (five clones and casts otherwise), and backward write d(qkv) in its layout (a stack and a permuted
    copy otherwise)."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, n_head: int, dropout_p: float) -> torch.Tensor:
        B, T, width = qkv.shape
        D = width // (3 * n_head)
        rows = B * n_head
        parts = qkv.view(B, T, 3, n_head, D)
        kv = torch.empty(2, B, n_head, T, D, dtype=torch.bfloat16)
        for i in range(2):  # head-major copies (one 5-D permuted copy is ~2x slower)
            kv[i].copy_(parts[:, :, i + 1].transpose(1, 2))
        q_blocks = _split_rows(parts[:, :, 0].transpose(1, 2), T)
        k3, v3 = kv.view(2, rows, T, D).unbind(0)
        scale = D**-0.5
        outs, probs, keep = _attention_forward(q_blocks, k3, v3, scale, dropout_p)
        ctx.save_for_backward(kv, keep, *q_blocks, *outs, *probs)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        y = torch.empty(B, T, n_head, D, dtype=torch.bfloat16)
        for (r0, r1), out in zip(query_blocks(T), outs, strict=True):
            y[:, r0:r1] = out.view(B, n_head, r1 - r0, D).transpose(1, 2)
        return y.view(B, T, n_head * D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kv, keep, *rest = ctx.saved_tensors
        n = len(rest) // 3
        q_blocks, outs, probs = rest[:n], rest[n:2 * n], rest[2 * n:]
        _, B, H, T, D = kv.shape
        k3, v3 = kv.view(2, B * H, T, D).unbind(0)
        do_blocks = _split_rows(grad_y.view(B, T, H, D).transpose(1, 2), T)  # head-major and bf16 in one pass per block
        grad_qs, grad_k, grad_v = _attention_backward(q_blocks, k3, v3, outs, probs, keep, do_blocks, ctx.scale, ctx.dropout_p)
        grad = torch.empty(B, T, 3, H, D, dtype=torch.bfloat16)  # the fused projection's output layout, written once
        for (r0, r1), grad_q in zip(query_blocks(T), grad_qs, strict=True):
            grad[:, r0:r1, 0] = grad_q.view(B, H, r1 - r0, D).transpose(1, 2)
        grad[:, :, 1] = grad_k.view(B, H, T, D).transpose(1, 2)
        grad[:, :, 2] = grad_v.view(B, H, T, D).transpose(1, 2)
        return grad.view(B, T, 3 * H * D), None, None


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
