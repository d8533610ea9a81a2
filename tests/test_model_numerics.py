"""RMSNorm and rotary embeddings against plain float64 references: forward, gradients, dtypes, edge cases."""

import math

import pytest
import torch

from memzoo.model.rope import RotaryEmbedding
from memzoo.nn.norms import RMSNorm, rms_norm


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, weight = x.double(), weight.double()
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def reference_rope(x: torch.Tensor, start: int, base: float = 10000.0) -> torch.Tensor:
    """Pair ``(i, i + d/2)`` at position ``p`` rotated by ``p · base^(-2i/d)``, written out in float64."""
    x = x.double()
    T, d = x.shape[1], x.shape[-1]
    out = torch.empty_like(x)
    for t in range(T):
        for i in range(d // 2):
            angle = (start + t) * base ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, t, ..., i], x[:, t, ..., i + d // 2]
            out[:, t, ..., i] = a * c - b * s
            out[:, t, ..., i + d // 2] = b * c + a * s
    return out


def grads(fn, *inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, grad_out.to(y.dtype))


@pytest.mark.parametrize("shape", [(7,), (2, 5, 16), (3, 2, 4, 8)])
def test_rms_norm_equals_float64_reference_forward_and_grads(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    grad_out = torch.randn(shape, generator=g)
    y, (gx, gw) = grads(lambda a, b: rms_norm(a, b, 1e-6), x, w, grad_out=grad_out)
    y_ref, (gx_ref, gw_ref) = grads(
        lambda a, b: reference_rms_norm(a, b, 1e-6), x.double(), w.double(), grad_out=grad_out
    )
    assert y.dtype == gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_gradcheck_in_float64_and_zero_rows():
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    x[1, 2] = 0.0  # a zero row: output 0, gradient x-independent and finite
    w = torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x.requires_grad_(), w.requires_grad_()))
    torch.testing.assert_close(rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_computes_half_precision_in_float32_and_returns_its_dtype(dtype):
    x = (torch.randn(4, 32) * 100).to(dtype)  # x² overflows float16 if squared in float16
    norm = RMSNorm(32).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    y = norm(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, reference_rms_norm(x, norm.weight, norm.eps).to(dtype))
    x.requires_grad_(True)
    norm(x).sum().backward()
    assert x.grad.dtype == dtype and norm.weight.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_rms_norm_rejects_a_weight_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not match the last dim"):
        rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)


@pytest.mark.parametrize("shape,start", [((2, 5, 3, 8), 0), ((2, 5, 3, 8), 4), ((1, 6, 2, 3, 4), 2)])
def test_rope_equals_float64_reference_forward_and_grads(shape, start):
    rope = RotaryEmbedding(head_dim=shape[-1], max_seq_len=12)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    grad_out = torch.randn(shape, generator=g)
    y, (gx,) = grads(lambda a: rope(a, start), x, grad_out=grad_out)
    y_ref, (gx_ref,) = grads(lambda a: reference_rope(a, start), x.double(), grad_out=grad_out)
    assert y.dtype == gx.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-6)


def test_rope_gradcheck_in_float64_on_a_strided_view():
    rope = RotaryEmbedding(head_dim=4, max_seq_len=8)
    qkv = torch.randn(2, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    # queries and keys rotated together from a slice of the fused projection, as the attention does
    assert torch.autograd.gradcheck(lambda t: rope(t[:, :, :2], 1), (qkv,))
    torch.testing.assert_close(rope(qkv[:, :, :2], 1), reference_rope(qkv[:, :, :2], 1), rtol=1e-6, atol=1e-7)


def test_rope_half_precision_rotates_in_float32_and_returns_its_dtype():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=64)
    x = torch.randn(2, 64, 2, 8).bfloat16().requires_grad_(True)
    y = rope(x, 0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference_rope(x.detach(), 0).bfloat16())
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_rope_rejects_a_wrong_head_dim():
    with pytest.raises(ValueError, match="head_dim 8"):
        RotaryEmbedding(head_dim=8, max_seq_len=4)(torch.randn(1, 2, 1, 6))
