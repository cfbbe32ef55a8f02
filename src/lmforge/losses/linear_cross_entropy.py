"""LM head + cross-entropy in row chunks, so the (tokens, vocab) logits are never materialised whole.

Why: the logits are the largest activation of a small-width model (2048 tokens × 4096 vocab = 33.5 MB fp32
here, 8K tokens × 128K vocab = 4 GB for a Llama-3 shape) and the plain path touches them five times
(GEMM out, log_softmax, its saved output, a zero-filled grad, log_softmax backward). Chunked, each piece of
logits stays in cache-sized reusable memory; the softmax gradient (p - onehot) is formed in the forward pass
while the chunk is hot, and the backward pass only rescales the saved d(hidden) and d(weight) by the incoming
scalar. On CPU, where glibc hands every > 32 MB block back to the OS, this also saves the page faults of
re-allocating logits-sized buffers each step. Same idea as Liger-Kernel's fused linear cross-entropy and
torchtune's chunked loss; the maths is the textbook softmax cross-entropy gradient.

`reduction="none"` gives each target's NLL (DPO's sequence log-probs, RL's token log-probs, optionally with
each position's entropy): its upstream gradient differs per row, so that path keeps each row's logsumexp and
recomputes the chunk logits in backward instead of forming gradients ahead.

`linear_cross_entropy(hidden, head, targets)` falls back to `cross_entropy(head(hidden))` whenever the head
is not a plain bias-free `nn.Linear` on ordinary tensors (LoRA-wrapped or quantised heads, tensor-parallel
layouts other than the one below, DeepSpeed ZeRO-3 partitions that only its module hooks can gather), so it is
always safe to call. A vocab-parallel (tensor-parallel) head runs the same chunks on each rank's V/tp rows, all-reducing two
per-row statistics per chunk (Megatron's vocab-parallel cross-entropy, chunked); other heads whose logits come
out vocab-sharded go through torch's `loss_parallel` (`vocab_parallel_cross_entropy`; summed loss only, per-token
NLL from such heads gathers the logits). The chunked paths never gather them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import compiled, workspace
from lmforge.kernels.linear import gemm_nt, gemm_tn, is_plain_linear, on_onednn
from lmforge.losses.vocab_parallel_cross_entropy import (
    gather_vocab,
    is_vocab_sharded,
    vocab_parallel_cross_entropy,
)


def fusable(head: nn.Module) -> bool:
    """True where the chunked path computes exactly what `head(hidden)` would."""
    if not is_plain_linear(head) or head.bias is not None:
        return False
    weight = head.weight
    return type(weight) in (nn.Parameter, torch.Tensor) and not hasattr(weight, "ds_id") and not weight.is_meta


MIN_CHUNK_ROWS = 256  # below this the chunk GEMMs lose more than the smaller logits save (CPU, V=32000: 64 rows 3.2 s, 256 rows 1.9 s)


# On a GPU: rows per chunk up to this much float32 logits. At 256 rows the d(hidden) GEMM's (rows x width) output is a
# few dozen tiles for 100+ SMs (GPT-2: 256 x 768, 64 chunks a step); 512 MB gives 2048 rows at vocab 50304, 1024 at
# 128256, and bounds the loss's memory whatever the token count. (Chosen by that arithmetic: not yet timed on a GPU.)
GPU_CHUNK_LOGITS_BYTES = 512 << 20


def chunk_rows(n_rows: int, vocab: int, width: int, device: str = "cpu") -> int:
    """Rows per chunk, a power of two of at least MIN_CHUNK_ROWS. CPU: each chunk's logits about as large as the
    hidden states (Liger's rule). GPU: as many rows as GPU_CHUNK_LOGITS_BYTES of float32 logits holds."""
    if device != "cpu":
        budget = max(MIN_CHUNK_ROWS, GPU_CHUNK_LOGITS_BYTES // (4 * max(vocab, 1)))
        return min(1 << (budget.bit_length() - 1), max(MIN_CHUNK_ROWS, 1 << (n_rows - 1).bit_length()))
    pieces = max(1, math.ceil(vocab / max(width, 1)))
    rows = max(1, math.ceil(n_rows / pieces))
    return max(1 << (rows - 1).bit_length(), MIN_CHUNK_ROWS)  # next power of two


def _operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Hidden and weight in the GEMM dtype (autocast's, which is active inside Function.forward, else the input's)
    and the softmax-side dtype: fp32, or fp64 for fp64 inputs."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return hidden.to(dtype), weight.to(dtype), torch.promote_types(dtype, torch.float32)


G_BUFFER_BYTES = 256 << 20  # softmax gradients gathered per d(weight) GEMM (see _WeightGrad); 32 MB held 1 chunk at
# vocab 50304 (bf16, 4096 x 768 hidden, 2 CPU cores: loss + grads 2.2 s, 1.4-1.5 s at 256 MB; vocab 4096: no change)


class _WeightGrad:
    """d(weight) = Σ over chunks of gᵀ·h_c, in float32 (`acc`). The chunks' g are gathered, in order, into a buffer
    of up to G_BUFFER_BYTES (every chunk at a small vocabulary) and multiplied by their rows of h in one GEMM
    per buffer: per 256-row chunk, a short-K GEMM plus a float32 add of a fresh (V, C) product cost more than the
    copy into the buffer (a bf16 GPT step here: 8 chunk GEMMs + casts + adds -> one GEMM + one cast). In bf16
    the product is rounded once per buffer, as autograd's single d(weight) GEMM of the unchunked head is.
    Where a buffer would hold one chunk only, each chunk is multiplied directly."""

    def __init__(self, h: torch.Tensor, shape: torch.Size, rows: int, acc: torch.dtype) -> None:
        self.h, self.shape, self.acc = h, shape, acc
        per_row = shape[0] * h.element_size()
        cap = min(h.size(0), max(rows, (G_BUFFER_BYTES // per_row) // rows * rows))
        # reused across calls (a fresh 16-32 MB buffer page-faults in on CPU each step): filled and consumed here
        self.buf = workspace.scratch("lce_grads", (cap, shape[0]), h.dtype, h.device) if cap > rows else None
        self.start = self.fill = 0  # buffered rows are h[start : start + fill]
        self.grad: torch.Tensor | None = None

    def add(self, g: torch.Tensor) -> None:
        """The next chunk's g (its rows follow the previous chunk's)."""
        if self.buf is None:
            self._multiply(g)
            return
        if self.fill + g.size(0) > self.buf.size(0):
            self.flush()
        self.buf[self.fill : self.fill + g.size(0)].copy_(g)
        self.fill += g.size(0)

    def flush(self) -> None:
        if self.buf is not None and self.fill:
            self._multiply(self.buf[: self.fill])

    def _multiply(self, g: torch.Tensor) -> None:
        h_c = self.h[self.start : self.start + g.size(0)]
        self.start += g.size(0)
        self.fill = 0
        if self.grad is not None and g.dtype == self.acc and not on_onednn(g, h_c):
            self.grad.addmm_(g.t(), h_c)  # summed inside the GEMM (GPU: no product tensor)
            return
        product = gemm_tn(g, h_c)  # oneDNN for float32 on CPU (kernels/linear.py), else gᵀ·h_c (bf16: a bf16 product)
        self.grad = product.to(self.acc) if self.grad is None else self.grad.add_(product)  # add_ converts as it reads

    def result(self) -> torch.Tensor:
        self.flush()
        return self.grad if self.grad is not None else torch.zeros(self.shape, dtype=self.acc, device=self.h.device)


def _grad_hidden(out: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
    """out = g · w (one chunk's d(hidden))."""
    if on_onednn(g, w):
        out.copy_(gemm_nt(g, w.t()))
    else:
        torch.mm(g, w, out=out)


def _chunk_nll_and_grad(logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's summed NLL of targets `safe` (N, 1) on rows where `valid` (N, 1), and d(sum NLL)/d(logits) =
    softmax - onehot(target) on those rows, 0 on the others, computed in float32 and rounded once to the logits'
    dtype. Compiled into one kernel on CPU (`_CHUNK_KERNEL`); `_chunk_eager` spells the same maths in fewer,
    in-place eager passes for other devices. No Python-number arguments: each would be a recompile guard."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    nll = torch.where(valid, lse - x.gather(1, safe), 0.0).sum()
    onehot = torch.arange(x.size(1), device=x.device).unsqueeze(0) == safe
    grad = torch.where(valid, torch.exp(x - lse) - onehot.float(), 0.0)
    return nll, grad.to(logits.dtype)


_CHUNK_KERNEL = compiled.CompiledKernel(_chunk_nll_and_grad)


def _chunk_eager(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, acc: torch.dtype, grad_dtype: torch.dtype,
    need_grad: bool, group: Any, vocab_offset: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_chunk_nll_and_grad` in eager in-place passes (the gradient only if `need_grad`); with `group`, for a
    head holding vocabulary rows [vocab_offset, ...) of a vocab-parallel head."""
    valid = targets != ignore_index
    if group is None:
        logprobs = torch.log_softmax(logits.to(acc), dim=1)  # one fused pass (logsumexp is four)
        hit, safe = valid, torch.where(valid, targets, 0).unsqueeze(1)
        nll = -logprobs.gather(1, safe).squeeze(1).masked_fill(~valid, 0.0).sum()
        probs = logprobs.exp_() if need_grad else logprobs
    else:
        logits = logits.to(acc)
        lse, picked, hit, safe = _shard_logsumexp(logits, targets, valid, vocab_offset, group)
        nll = (lse - picked).masked_fill(~valid, 0.0).sum()
        probs, safe = logits.sub_(lse.unsqueeze(1)).exp_(), safe.unsqueeze(1)
    if not need_grad:
        return nll, None
    # d(sum NLL)/d(logits) = p - onehot(target) on counted rows, 0 elsewhere (onehot: on the target's shard)
    probs.scatter_add_(1, safe, -hit.to(probs.dtype).unsqueeze(1))
    probs *= valid.unsqueeze(1)
    return nll, probs.to(grad_dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of `targets` under softmax(hidden @ weightᵀ); gradients formed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, rows: int,
        group: Any = None, vocab_offset: int = 0,
    ) -> torch.Tensor:
        """`group`/`vocab_offset`: `weight` holds vocabulary rows [offset, offset + rows) of a head sharded over
        the tensor-parallel `group`; softmax statistics are all-reduced per chunk, d(hidden) once at the end."""
        h, w, acc = _operands(hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = _WeightGrad(h, w.shape, rows, acc) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        need_g = need_h or need_w
        fused = group is None and need_g and acc == torch.float32 and compiled.usable(h) and not _CHUNK_KERNEL.failed
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), rows):
                h_c, t_c = h[start : start + rows], targets[start : start + rows]
                if fused and h_c.size(0) > 1:  # one compiled pass on CPU (a 1-row chunk would be a recompile)
                    valid = (t_c != ignore_index).unsqueeze(1)
                    nll, g = _CHUNK_KERNEL(gemm_nt(h_c, w), torch.where(valid, t_c.unsqueeze(1), 0), valid)
                else:
                    nll, g = _chunk_eager(gemm_nt(h_c, w), t_c, ignore_index, acc, h.dtype, need_g, group, vocab_offset)
                total += nll
                if need_h:
                    _grad_hidden(grad_h[start : start + rows], g, w)
                if need_w:
                    grad_w.add(g)
            grad_w = grad_w.result() if need_w else None
        if group is not None and need_h:  # each shard's d(hidden) is a partial sum over its vocabulary rows
            torch.distributed.all_reduce(grad_h, group=group)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h * grad_out).to(ctx.dtypes[0])
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None


class _LinearTokenNLL(torch.autograd.Function):
    """Per-row NLL (N,) of `targets` under softmax(hidden @ weightᵀ), 0 on ignored rows. The upstream gradient
    differs per row, so d(weight) cannot be formed ahead as in `_LinearCrossEntropy`: forward keeps only each
    row's logsumexp, backward recomputes each chunk's logits (one GEMM more than the plain path, no logits kept).
    With `with_entropy`, also each row's softmax entropy (N,) as a second, non-differentiable output (RL logs it);
    else that output is empty. Both come back in `shape` (the targets' (B, T)) as tensors of their own, not views:
    FSDP2 warns about a root module returning a view, whose in-place edit would skip its pre-backward hook."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, rows: int, with_entropy: bool,
        group: Any = None, vocab_offset: int = 0, shape: torch.Size | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`group`/`vocab_offset` as in `_LinearCrossEntropy`: this rank holds a vocabulary shard of the head."""
        h, w, acc = _operands(hidden, weight)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)  # under TP: the local index where the target is on this shard
        hit = valid.clone()  # under TP: where the target is on this shard
        shape = shape or targets.shape
        nll_out = torch.empty(shape, dtype=acc, device=h.device)
        nll = nll_out.view(-1)  # filled through this flat view; nll_out is what is returned
        lse = torch.empty_like(nll)
        entropy_out = torch.empty(shape if with_entropy else 0, dtype=acc, device=h.device)
        entropy = entropy_out.view(-1)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), rows):
                stop = start + rows
                logits = gemm_nt(h[start:stop], w).to(acc)
                if group is None:
                    lse[start:stop] = torch.logsumexp(logits, dim=1)
                    nll[start:stop] = lse[start:stop] - logits.gather(1, safe[start:stop].unsqueeze(1)).squeeze(1)
                else:
                    lse_c, picked, hit[start:stop], safe[start:stop] = _shard_logsumexp(logits, targets[start:stop], valid[start:stop],
                                                                                        vocab_offset, group)
                    lse[start:stop], nll[start:stop] = lse_c, lse_c - picked
                if with_entropy:  # -sum p log p with log p = logits - lse: stable, as entropy_from_logits
                    logp = logits.clamp_(min=torch.finfo(acc).min).sub_(lse[start:stop].unsqueeze(1))
                    entropy[start:stop] = -(logp.exp() * logp).sum(dim=1)
        if group is not None and with_entropy:  # each shard summed its own columns' -p log p
            torch.distributed.all_reduce(entropy, group=group)
        nll.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(h, w, safe, hit, valid, lse)
        ctx.group = group
        ctx.rows, ctx.dtypes = rows, (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(entropy_out)
        return nll_out, entropy_out

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, _grad_entropy: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
        h, w, safe, hit, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse.dtype
        scale = (grad_nll.reshape(-1).to(acc) * valid).unsqueeze(1)  # d(nll_i)/d(logits_i) = p_i - onehot_i, times the row's grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = _WeightGrad(h, w.shape, ctx.rows, acc) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), ctx.rows):
                stop = start + ctx.rows
                h_c = h[start:stop]
                probs = (gemm_nt(h_c, w).to(acc) - lse[start:stop].unsqueeze(1)).exp_()
                probs.scatter_add_(1, safe[start:stop].unsqueeze(1), -hit[start:stop].to(acc).unsqueeze(1))
                probs *= scale[start:stop]
                g = probs.to(h.dtype)
                if need_h:
                    _grad_hidden(grad_h[start:stop], g, w)
                if need_w:
                    grad_w.add(g)
            grad_w = grad_w.result() if need_w else None
        if ctx.group is not None and need_h:  # partial sums over this shard's vocabulary rows
            torch.distributed.all_reduce(grad_h, group=ctx.group)
        dh = None if grad_h is None else grad_h.to(ctx.dtypes[0])
        dw = None if grad_w is None else grad_w.to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None, None, None


def _shard_logsumexp(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, offset: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row logsumexp and target logit over a vocabulary split across `group` (this rank's columns start at
    `offset`), in two all-reduces: the row max, then the sum of exponentials stacked with the target logit (which
    one rank holds). Returns (lse, target logit, where the target is on this rank, its local index)."""
    import torch.distributed as dist

    row_max = logits.amax(dim=1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    local = targets - offset
    hit = valid & (local >= 0) & (local < logits.size(1))
    safe = torch.where(hit, local, 0)
    sums = torch.stack([(logits - row_max.unsqueeze(1)).exp_().sum(dim=1), logits.gather(1, safe.unsqueeze(1)).squeeze(1) * hit])
    dist.all_reduce(sums, group=group)
    return row_max + sums[0].log(), sums[1], hit, safe


def vocab_shard(head: nn.Module) -> tuple[torch.Tensor, Any, int] | None:
    """(local weight, TP process group, first vocabulary row) for a bias-free `nn.Linear` whose weight is a DTensor
    sharded by rows over one mesh dimension (`parallel/tensor_parallel.py:shard_lm_head`, also after FSDP2's
    all-gather); None for anything else. The local weight is `to_local()`'s view, so gradients reach the DTensor."""
    if not is_plain_linear(head) or head.bias is not None or type(head.weight) in (nn.Parameter, torch.Tensor):
        return None
    from torch.distributed.tensor import DTensor, Shard

    weight = head.weight
    if not isinstance(weight, DTensor) or weight.device_mesh.ndim != 1 or weight.placements != (Shard(0),):
        return None
    from lmforge.parallel.vocab_parallel_embedding import row_block

    mesh, vocab = weight.device_mesh, weight.shape[0]
    offset, per_rank = row_block(weight)
    local = weight.to_local()
    if local.shape[0] != max(0, min(per_rank, vocab - offset)) or local.shape[0] == 0:
        return None  # a layout this arithmetic does not describe: let the module (and loss_parallel) handle it
    return local, mesh.get_group(), offset


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, ignore_index: int = -100, rows: int | None = None,
    reduction: str = "sum", with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy of `targets` (any shape, `ignore_index` = skip) under `head(hidden)`, or with
    `reduction="none"` each target's NLL in `targets`' shape (0 where ignored: DPO's and RL's log-probs), and
    then with `with_entropy` also each position's softmax entropy (detached), as a pair."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if with_entropy and reduction != "none":
        raise ValueError("with_entropy needs reduction='none' (entropies are per position)")
    flat_targets = targets.reshape(-1)
    shard = vocab_shard(head)  # a vocab-parallel head: the same chunks on this rank's V/tp rows, statistics all-reduced
    if shard is None and not fusable(head):  # the head sees `hidden` in its own shape: TP/SP plans expect (B, T, d)
        logits = head(hidden)
        logits = logits.reshape(-1, logits.size(-1))
        if is_vocab_sharded(logits):
            if reduction == "sum":
                return vocab_parallel_cross_entropy(logits, flat_targets, ignore_index)
            logits = gather_vocab(logits)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(logits, flat_targets, ignore_index=ignore_index, reduction=reduction)
        if reduction == "sum":
            return nll
        if not with_entropy:
            return nll.view(targets.shape)
        from lmforge.losses.logprobs import entropy_from_logits

        return nll.view(targets.shape), entropy_from_logits(logits.detach()).view(targets.shape)
    weight, group, offset = shard or (head.weight, None, 0)
    flat = hidden.reshape(-1, hidden.size(-1))
    rows = rows or chunk_rows(flat.size(0), weight.size(0), flat.size(1), flat.device.type)
    if reduction == "none":
        nll, entropy = _LinearTokenNLL.apply(flat, weight, flat_targets, ignore_index, rows, with_entropy, group, offset, targets.shape)
        return (nll, entropy) if with_entropy else nll
    return _LinearCrossEntropy.apply(flat, weight, flat_targets, ignore_index, rows, group, offset)
