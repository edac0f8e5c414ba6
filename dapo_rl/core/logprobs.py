"""Memory-efficient per-token log-probabilities from final hidden states.

The policy-gradient loss only needs ``log p(token)`` (and optionally the entropy) for each
generated token, but the plain way to get it -- ``log_softmax(hidden @ W.T).gather(tokens)`` --
materialises a ``(tokens, vocab)`` logits tensor, plus its log-softmax and their gradients in
backward. At Qwen2.5 shapes (vocab 151,936) that is ~0.6 GB per 1,000 tokens *per copy* in
float32, and it dominates the training step's peak memory for long responses.

:func:`token_logprobs` instead walks the tokens in chunks of ``chunk_size`` rows, keeping only
one chunk's logits alive at a time, and saves just ``hidden``, ``weight``, ``tokens`` and a
per-token logsumexp (and entropy) for backward, where each chunk's logits are recomputed. The
price is one extra ``hidden @ W.T`` matmul in backward; the gain is that peak extra memory no
longer grows with sequence length (beyond the ``(N,)`` per-token statistics).

Pure torch, no Ray, device-agnostic (only matmuls, elementwise ops, gather/scatter, reductions).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["token_logprobs"]

# 512 rows x 151,936 vocab x 4 bytes = 0.29 GiB of float32 logits per chunk (Qwen2.5 vocab).
# Measured on CPU (benchmarks/results/logprobs_cpu.md): 512-row GEMMs run within ~5% of 1024-row
# ones, while 1024 rows would double the chunk buffer, which (with the unavoidable (V, H) weight
# gradient) is all the extra memory this path needs. On GPU every per-chunk op is a large kernel
# either way. Lower it to trade speed for memory.
_DEFAULT_CHUNK_SIZE = 512

# Dtypes whose logits are upcast to float32 before any reduction: summing 150k exp() terms in
# bf16/fp16 would lose most of the mantissa.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which logits are reduced and results returned: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkBuffers:
    """Per-call scratch buffers reused by every chunk.

    Re-allocating a fresh ``(chunk, V)`` tensor per chunk would make the CPU allocator hand the
    pages back to the OS and fault them in again every time (large allocations are mmap'ed),
    which costs about as much as the arithmetic on them; reusing them avoids that.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, second: bool):
        acc = _acc_dtype(dtype)
        # Logits as produced by the matmul, in the input dtype (only needed when that differs
        # from the accumulation dtype, i.e. bf16/fp16).
        self.raw = torch.empty(rows, vocab, dtype=dtype, device=device) if acc != dtype else None
        self.main = torch.empty(rows, vocab, dtype=acc, device=device)
        # A second accumulation-dtype buffer, only for entropy (needs logits and probabilities
        # at the same time).
        self.aux = torch.empty(rows, vocab, dtype=acc, device=device) if second else None

    def logits(self, h: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
        """``(h @ weight.T) / temperature`` for one chunk, in the accumulation dtype.

        The 1/temperature scaling is folded into the GEMM's alpha, so it costs no extra pass
        over the (rows, V) block. beta=0 means the (uninitialised) buffer content is ignored,
        NaNs included, per torch.addmm's contract.
        """
        n = h.shape[0]
        if self.raw is None:
            out = self.main[:n]
            out.addmm_(h, weight.t(), beta=0, alpha=inv_temp)
            return out
        raw = self.raw[:n]
        raw.addmm_(h, weight.t(), beta=0, alpha=inv_temp)
        out = self.main[:n]
        out.copy_(raw)  # upcast before any reduction
        return out


def _chunk_bounds(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


class _TokenLogprobs(torch.autograd.Function):
    """Chunked ``log_softmax(hidden @ W.T / T).gather(tokens)`` with recompute in backward.

    Inputs are already flattened and validated: ``hidden`` (N, H), ``weight`` (V, H),
    ``tokens`` (N,) int64. Returns ``(logprobs, entropy)``, both (N,) in the accumulation dtype;
    ``entropy`` is an empty non-differentiable tensor when ``with_entropy`` is False.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        inv_temp: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        logprobs = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=acc, device=hidden.device)
        if n:
            bufs = _ChunkBuffers(min(chunk_size, n), vocab, hidden.dtype, hidden.device, with_entropy)
            for s, e in _chunk_bounds(n, chunk_size):
                z = bufs.logits(hidden[s:e], weight, inv_temp)
                # Stable logsumexp by hand (torch.logsumexp would allocate another (rows, V)
                # temporary): shift by the row max, exponentiate in place.
                m = z.amax(dim=1, keepdim=True)
                target = z.gather(1, tokens[s:e, None])
                z.sub_(m)  # z := shifted logits, all <= 0
                if with_entropy:
                    assert bufs.aux is not None  # allocated when with_entropy
                    p = bufs.aux[: e - s]
                    torch.exp(z, out=p)
                    sumexp = p.sum(dim=1, keepdim=True)
                    # H = log(sum e^s) - sum(e^s * s) / sum(e^s)   (shift-invariant)
                    weighted = p.mul_(z).sum(dim=1, keepdim=True)
                    log_sumexp = sumexp.log()
                    entropy[s:e] = (log_sumexp - weighted / sumexp).squeeze(1)
                else:
                    log_sumexp = z.exp_().sum(dim=1, keepdim=True).log_()
                row_lse = (m + log_sumexp).squeeze(1)
                lse[s:e] = row_lse
                logprobs[s:e] = target.squeeze(1) - row_lse
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
        ctx.inv_temp = inv_temp
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        # Unused outputs then arrive as None in backward, so their work can be skipped.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_entropy = None
        grad_hidden: torch.Tensor | None = None
        grad_weight: torch.Tensor | None = None
        if not (need_h or need_w):
            return None, None, None, None, None, None
        n, vocab = hidden.shape[0], weight.shape[0]
        low = hidden.dtype in _LOW_PRECISION
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
        if need_w:
            # bf16/fp16 grads are summed over chunks in float32 and rounded once at the end.
            # Left uninitialised: the first chunk's GEMM overwrites it (beta=0), saving a
            # (V, H) zero-fill pass.
            grad_weight = torch.empty(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device)
        if n == 0 or (grad_logprobs is None and grad_entropy is None):
            if grad_weight is not None:
                grad_weight.zero_()
            return (grad_hidden, _cast(grad_weight, weight.dtype), None, None, None, None)

        inv_temp = ctx.inv_temp
        with_aux = grad_entropy is not None
        bufs = _ChunkBuffers(min(ctx.chunk_size, n), vocab, hidden.dtype, hidden.device, with_aux)
        for s, e in _chunk_bounds(n, ctx.chunk_size):
            h = hidden[s:e]
            z = bufs.logits(h, weight, inv_temp)
            z.sub_(lse[s:e, None])  # z := log p
            # d logp_t / dz = onehot_t - p ;  d H / dz = -p * (log p + H)
            # => dL/dz = g_lp * onehot - p * (g_lp + g_H * (log p + H)),  per row.
            if grad_entropy is not None:
                g_ent = grad_entropy[s:e, None].to(z.dtype)
                assert bufs.aux is not None  # allocated when there is an entropy gradient (with_aux)
                p = bufs.aux[: e - s]
                torch.exp(z, out=p)
                offset = g_ent * entropy[s:e, None]
                if grad_logprobs is not None:
                    offset = offset + grad_logprobs[s:e, None].to(z.dtype)
                # z := -(g_H * log p + offset) * p
                z.mul_(-g_ent).sub_(offset).mul_(p)
            else:
                assert grad_logprobs is not None  # one of the two gradients is there (checked above)
                z.exp_()  # z := p
                z.mul_(-grad_logprobs[s:e, None].to(z.dtype))
            if grad_logprobs is not None:
                # The one-hot term, without a (rows, V) one-hot: read, add, write back. Indices
                # are unique per row, so scatter_ (not scatter_add_) is exact and deterministic.
                idx = tokens[s:e, None]
                z.scatter_(1, idx, z.gather(1, idx) + grad_logprobs[s:e, None].to(z.dtype))
            # z now holds dL/d(logits/T); the chain rule's 1/T goes into the GEMMs' alpha.
            if low:
                assert bufs.raw is not None  # allocated for low-precision inputs
                g = bufs.raw[: e - s]
                g.copy_(z)  # matmuls run in the input dtype, as the forward ones did
            else:
                g = z
            if need_h:
                assert grad_hidden is not None
                grad_hidden[s:e].addmm_(g, weight, beta=0, alpha=inv_temp)
            if need_w:
                assert grad_weight is not None
                first = s == 0
                if low:
                    # addmm cannot mix a bf16 product with a float32 destination.
                    part = torch.mm(g.t(), h)
                    if first:
                        torch.mul(part, inv_temp, out=grad_weight)
                    else:
                        grad_weight.add_(part, alpha=inv_temp)
                else:
                    grad_weight.addmm_(g.t(), h, beta=0 if first else 1, alpha=inv_temp)
        return grad_hidden, _cast(grad_weight, weight.dtype), None, None, None, None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = _DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``tokens`` under ``softmax(hidden @ weight.T / temperature)``.

    Equivalent to ``torch.log_softmax(hidden @ weight.T / temperature, -1).gather(-1,
    tokens[..., None])[..., 0]`` (values and gradients), but never holds more than
    ``chunk_size`` rows of logits at once: logits are computed chunk by chunk in forward and
    recomputed chunk by chunk in backward. Only ``hidden``, ``weight``, ``tokens`` and per-token
    logsumexp (and entropy) are kept for backward.

    Args:
        hidden: final hidden states, ``(B, T, H)`` or ``(N, H)``, floating point.
        weight: output projection (``lm_head.weight``, possibly tied to the input embeddings),
            ``(V, H)``, same dtype and device as ``hidden``. No bias.
        tokens: token ids to score, ``(B, T)`` or ``(N,)`` (the leading shape of ``hidden``),
            integer dtype, values in ``[0, V)``.
        temperature: sampling temperature (> 0, finite); logits are divided by it.
        chunk_size: rows (tokens) of logits materialised at a time, >= 1. Peak extra memory is
            about ``chunk_size * V`` float32 values (twice that with ``return_entropy``; plus a
            bf16/fp16 copy for those dtypes) plus a float32 ``(V, H)`` gradient accumulator.
        return_entropy: also return the entropy of the tempered distribution at each position.

    Returns:
        ``logprobs`` of shape ``tokens.shape``; with ``return_entropy``, the tuple
        ``(logprobs, entropy)`` of that shape. Both are float32 (float64 for float64 inputs):
        bf16/fp16 logits are upcast per chunk before any reduction. Both are differentiable
        w.r.t. ``hidden`` and ``weight`` (first-order only: double backward is not supported).

    Raises:
        ValueError: on wrong ranks/shapes/dtypes/devices, ``temperature <= 0``,
            ``chunk_size < 1``, or any token outside ``[0, V)``. (The token range check reads
            min/max back from the device: one host sync on CUDA.)
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, tokens)):
        raise ValueError("hidden, weight and tokens must be torch.Tensor")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, H) or (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)} (V, H)")
    if tuple(tokens.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} (hidden {tuple(hidden.shape)})"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if not (hidden.device == weight.device == tokens.device):
        raise ValueError(
            f"hidden, weight and tokens must be on one device, got {hidden.device}, {weight.device}, {tokens.device}"
        )

    lead = tokens.shape
    vocab, hsize = weight.shape
    flat_hidden = hidden.reshape(-1, hsize)
    flat_tokens = tokens.reshape(-1).long()
    if flat_tokens.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat_tokens))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"tokens must lie in [0, {vocab}) (vocab size), got min {lo}, max {hi}")

    outputs: tuple[torch.Tensor, torch.Tensor] = _TokenLogprobs.apply(  # type: ignore[no-untyped-call]  # torch leaves apply untyped
        flat_hidden, weight, flat_tokens, 1.0 / float(temperature), chunk_size, bool(return_entropy)
    )
    logprobs, entropy = outputs
    logprobs = logprobs.reshape(lead)
    if return_entropy:
        return logprobs, entropy.reshape(lead)
    return logprobs
