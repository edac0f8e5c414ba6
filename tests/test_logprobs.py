"""token_logprobs against the plain full-logits computation (values, entropy, gradients)."""

import math

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dapo_rl.core.logprobs import token_logprobs

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def reference(hidden, weight, tokens, temperature=1.0):
    """The naive path: whole logits tensor, log_softmax, gather; entropy of the tempered dist."""
    logp = torch.log_softmax((hidden @ weight.T) / temperature, dim=-1)
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def make(lead, hsize=16, vocab=37, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, hsize, generator=g, dtype=dtype) * scale).requires_grad_()
    weight = (torch.randn(vocab, hsize, generator=g, dtype=dtype) * scale).requires_grad_()
    tokens = torch.randint(0, vocab, lead, generator=g)
    return hidden, weight, tokens


def grads(out, inputs, seed=1):
    """Gradients of a random linear functional of out (a tensor or tuple of tensors)."""
    g = torch.Generator().manual_seed(seed)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs, retain_graph=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lead", [(2, 9), (13,)], ids=["3d", "2d"])
# 18 and 13 rows: 4 and 5 do not divide, 1 and 6 (for 18) / 13 do, 1000 is one partial chunk.
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 6, 13, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_grads_match_full_logits(dtype, lead, chunk_size, temperature):
    hidden, weight, tokens = make(lead, dtype=dtype, scale=1.5)
    lp = token_logprobs(hidden, weight, tokens, temperature=temperature, chunk_size=chunk_size)
    ref_lp, _ = reference(hidden, weight, tokens, temperature)
    assert lp.shape == tokens.shape
    assert lp.dtype == dtype  # float32 in -> float32 out, float64 stays float64
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    for got, want in zip(grads(lp, (hidden, weight)), grads(ref_lp, (hidden, weight))):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [3, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_entropy_values_and_grads(dtype, chunk_size, temperature):
    hidden, weight, tokens = make((3, 7), dtype=dtype, scale=1.5, seed=2)
    lp, ent = token_logprobs(
        hidden, weight, tokens, temperature=temperature, chunk_size=chunk_size, return_entropy=True
    )
    ref_lp, ref_ent = reference(hidden, weight, tokens, temperature)
    assert ent.shape == tokens.shape and ent.dtype == dtype
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    torch.testing.assert_close(ent, ref_ent, **TOL[dtype])
    # Through both outputs, and through entropy alone (logprobs unused in the loss).
    for out, ref in [((lp, ent), (ref_lp, ref_ent)), (ent, ref_ent)]:
        for got, want in zip(grads(out, (hidden, weight)), grads(ref, (hidden, weight))):
            torch.testing.assert_close(got, want, **TOL[dtype])


def test_entropy_of_uniform_and_peaked_distributions():
    vocab = 50
    # All-zero logits: uniform, entropy log V, every logprob -log V.
    hidden = torch.zeros(4, 8, dtype=torch.float64)
    weight = torch.randn(vocab, 8, dtype=torch.float64)
    lp, ent = token_logprobs(hidden, weight, torch.arange(4), return_entropy=True, chunk_size=3)
    torch.testing.assert_close(ent, torch.full((4,), math.log(vocab), dtype=torch.float64))
    torch.testing.assert_close(lp, torch.full((4,), -math.log(vocab), dtype=torch.float64))
    # Huge logits (would overflow exp without the max shift): near one-hot, entropy ~0, finite.
    hidden = torch.tensor([[1.0, 0.0]], dtype=torch.float32) * 1e4
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float32)
    lp, ent = token_logprobs(hidden, weight, torch.tensor([0]), return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert abs(lp.item()) < 1e-6 and abs(ent.item()) < 1e-6


def test_gradcheck_tiny_float64():
    hidden, weight, tokens = make((2, 3), hsize=4, vocab=6, seed=3)

    def fn(h, w):
        return token_logprobs(h, w, tokens, temperature=0.8, chunk_size=4, return_entropy=True)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-8)


def test_only_hidden_or_only_weight_requires_grad():
    hidden, weight, tokens = make((11,), seed=4)
    ref_gh, ref_gw = grads(reference(hidden, weight, tokens)[0], (hidden, weight))
    h_only = hidden.detach().requires_grad_()
    (gh,) = grads(token_logprobs(h_only, weight.detach(), tokens, chunk_size=4), (h_only,))
    torch.testing.assert_close(gh, ref_gh, **TOL[torch.float64])
    w_only = weight.detach().requires_grad_()
    (gw,) = grads(token_logprobs(hidden.detach(), w_only, tokens, chunk_size=4), (w_only,))
    torch.testing.assert_close(gw, ref_gw, **TOL[torch.float64])


def test_tied_weight_grads_accumulate():
    """weight used both as an embedding and as the output projection: grads add up."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(20, 8, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 20, (2, 6), generator=g)
    tokens = torch.randint(0, 20, (2, 6), generator=g)

    def run(fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight))
        (gw,) = torch.autograd.grad(fn(hidden).sum(), (weight,))
        return gw

    got = run(lambda h: token_logprobs(h, weight, tokens, chunk_size=5))
    want = run(lambda h: reference(h, weight, tokens)[0])
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_noncontiguous_hidden():
    hidden, weight, tokens = make((6, 5), seed=6)
    h_t = hidden.transpose(0, 1)  # (5, 6, H), not contiguous
    tok_t = tokens.transpose(0, 1)
    lp = token_logprobs(h_t, weight, tok_t, chunk_size=4)
    ref = reference(h_t, weight, tok_t)[0]
    torch.testing.assert_close(lp, ref, **TOL[torch.float64])
    for got, want in zip(grads(lp, (hidden, weight)), grads(ref, (hidden, weight))):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 4)])
def test_empty_input(lead):
    hidden, weight, tokens = make(lead, seed=7)
    lp, ent = token_logprobs(hidden, weight, tokens, return_entropy=True)
    assert lp.shape == lead and ent.shape == lead
    gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    assert gh.shape == hidden.shape
    assert gw.shape == weight.shape and torch.count_nonzero(gw) == 0


def test_max_and_zero_token_ids():
    hidden, weight, _ = make((4,), vocab=9, seed=8)
    tokens = torch.tensor([0, 8, 8, 0])
    torch.testing.assert_close(
        token_logprobs(hidden, weight, tokens, chunk_size=3), reference(hidden, weight, tokens)[0]
    )


def test_int32_tokens_accepted():
    hidden, weight, tokens = make((5,), seed=9)
    torch.testing.assert_close(token_logprobs(hidden, weight, tokens.int()), reference(hidden, weight, tokens)[0])


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor every aten op produces (allocations, matmuls, views,
    in-place results), forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_never_materialises_full_logits(dtype):
    """No tensor of any op, in forward or backward, holds more than chunk_size rows of logits:
    a (rows, V) block of any kind (a full ``hidden @ W.T``, a whole log-softmax, a full buffer)
    would show up here whatever function created it."""
    rows, vocab, hsize, chunk = 40, 37, 12, 8
    hidden, weight, tokens = make((rows,), hsize=hsize, vocab=vocab, dtype=torch.float64, seed=10)
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    recorder = _OutputShapes()
    with recorder:
        lp, ent = token_logprobs(hidden, weight, tokens, chunk_size=chunk, return_entropy=True)
        torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    ops = {name for name, _ in recorder.shapes}
    assert any("addmm" in name or "mm" in name for name in ops)  # the matmuls were seen ...
    assert any("scatter" in name for name in ops)  # ... backward's too
    # (rows, V) blocks; (H, V) is the transposed weight fed to the matmuls.
    logits_blocks = [
        shape for _, shape in recorder.shapes if len(shape) == 2 and shape[1] == vocab and shape != (hsize, vocab)
    ]
    assert logits_blocks and max(rows for rows, _ in logits_blocks) == chunk
    # The (V, H) weight gradient is the largest thing allowed: far below rows x V.
    largest = max(math.prod(shape) for _, shape in recorder.shapes)
    assert largest <= max(chunk * vocab, vocab * hsize, rows * hsize) < rows * vocab, recorder.shapes


def test_bfloat16_upcast_cpu():
    """bf16 inputs: results are float32 and close to the float32 computation."""
    hidden, weight, tokens = make((2, 10), hsize=32, vocab=300, dtype=torch.float32, seed=11)
    lp, ent = token_logprobs(hidden.bfloat16(), weight.bfloat16(), tokens, chunk_size=7, return_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    ref_lp, ref_ent = reference(hidden.bfloat16().float(), weight.bfloat16().float(), tokens)
    # Logits are rounded to bf16 (8 bits of mantissa) before the float32 reductions.
    torch.testing.assert_close(lp, ref_lp, rtol=0.05, atol=0.15)
    torch.testing.assert_close(ent, ref_ent, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_cpu(dtype):
    """bf16/fp16 backward (float32 grad_weight accumulation over 3 chunks) tracks float32."""
    hidden, weight, tokens = make((2, 10), hsize=32, vocab=300, dtype=torch.float32, seed=13)
    h_lo = hidden.detach().to(dtype).requires_grad_()
    w_lo = weight.detach().to(dtype).requires_grad_()
    out_lo = token_logprobs(h_lo, w_lo, tokens, chunk_size=7, temperature=0.8, return_entropy=True)
    h32 = h_lo.detach().float().requires_grad_()
    w32 = w_lo.detach().float().requires_grad_()
    ref = reference(h32, w32, tokens, 0.8)
    got = grads(out_lo, (h_lo, w_lo))
    want = grads(ref, (h32, w32))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 0.03, rel


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(chunk_size=0), "chunk_size.*0"),
        (dict(chunk_size=-3), "chunk_size.*-3"),
        (dict(chunk_size=2.5), "chunk_size.*2.5"),
        (dict(chunk_size=True), "chunk_size"),
    ],
)
def test_invalid_scalar_arguments(kwargs, match):
    hidden, weight, tokens = make((3,))
    with pytest.raises(ValueError, match=match):
        token_logprobs(hidden, weight, tokens, **kwargs)


def test_invalid_shapes_dtypes_and_tokens():
    hidden, weight, tokens = make((2, 3), hsize=16, vocab=37)
    with pytest.raises(ValueError, match=r"\(2, 3, 16\).*\(37, 15\)"):
        token_logprobs(hidden, weight[:, :15], tokens)
    with pytest.raises(ValueError, match=r"tokens shape \(3, 2\).*\(2, 3\)"):
        token_logprobs(hidden, weight, tokens.T)
    with pytest.raises(ValueError, match=r"\(16,\)"):
        token_logprobs(hidden[0, 0], weight, tokens[0, 0])
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 16\)"):
        token_logprobs(hidden[None], weight, tokens[None])
    with pytest.raises(ValueError, match=r"weight must be \(V, H\)"):
        token_logprobs(hidden, weight[None], tokens)
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs(hidden.float(), weight, tokens)
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(hidden, weight, tokens.double())
    with pytest.raises(ValueError, match=r"\[0, 37\).*max 37"):
        token_logprobs(hidden, weight, torch.full_like(tokens, 37))
    with pytest.raises(ValueError, match=r"\[0, 37\).*min -1"):
        token_logprobs(hidden, weight, torch.full_like(tokens, -1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_matches_float32():
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(3, 700, 64, generator=g)
    weight = torch.randn(5000, 64, generator=g) * 0.3
    tokens = torch.randint(0, 5000, (3, 700), generator=g)
    dev = torch.device("cuda")
    h32 = hidden.to(dev).requires_grad_()
    w32 = weight.to(dev).requires_grad_()
    h16 = hidden.to(dev, torch.bfloat16).requires_grad_()
    w16 = weight.to(dev, torch.bfloat16).requires_grad_()
    tok = tokens.to(dev)
    lp32, ent32 = token_logprobs(h32, w32, tok, temperature=0.9, chunk_size=512, return_entropy=True)
    lp16, ent16 = token_logprobs(h16, w16, tok, temperature=0.9, chunk_size=512, return_entropy=True)
    assert lp16.dtype == torch.float32 and lp16.device.type == "cuda"
    ref32, refent32 = reference(h32, w32, tok, 0.9)
    torch.testing.assert_close(lp32, ref32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent32, refent32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp16, lp32, rtol=0.05, atol=0.25)
    torch.testing.assert_close(ent16, ent32, rtol=0.05, atol=0.15)
    gh32, gw32 = grads((lp32, ent32), (h32, w32))
    gh16, gw16 = grads((lp16, ent16), (h16, w16))
    assert gh16.dtype == torch.bfloat16 and gw16.dtype == torch.bfloat16
    for a, b in [(gh16, gh32), (gw16, gw32)]:
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 0.03, rel
