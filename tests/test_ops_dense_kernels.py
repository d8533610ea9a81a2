"""The C++ dense-layer kernels (memzoo.ops.cpu_dense) behind rms_norm, swiglu and the attention's rotary split,
against plain float64 references: forward and every gradient, widths that are not a multiple of the vector length,
one row, zero rows, out-of-range and non-finite SwiGLU inputs, grouped-query heads, strided gradients, two threads,
double backward (the PyTorch formulas), and the PyTorch path they replace (MEMZOO_CPU_KERNELS=0)."""

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from cpu_kernel_switch import kernels_switched
from memzoo.model.attention import CausalSelfAttention
from memzoo.model.rope import RotaryEmbedding
from memzoo.nn.activations import swiglu
from memzoo.nn.norms import HeadNorm, rms_norm, rms_normalize
from memzoo.ops import cpu_dense


def reference_rms_norm(x, w, eps):
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_rotate(x, cos, sin):
    """``x (B, T, H, hd)`` rotated with ``cos, sin (T, hd/2)`` in float64 ("rotate half")."""
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[None, :, None], sin.double()[None, :, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def float64_grads(fn, *inputs, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, grad_out.double())


def our_grads(fn, *inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, grad_out.to(y.dtype))


def tolerance(dtype):
    return {} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}


def test_the_dense_kernels_build_here():
    assert shutil.which("g++") or shutil.which("c++")
    assert cpu_dense.available(), cpu_dense._KERNELS.state.get("error")


# ------------------------------------------------------------------------------------------------ rms_norm
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 37), (4, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_kernel_matches_float64_forward_and_both_gradients(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x.view(-1, shape[-1])[0] = 0.0  # a zero row: output 0, finite gradients
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    grad_out = torch.randn(shape, generator=g)
    assert cpu_dense.supports(x, w)
    y, (gx, gw) = our_grads(lambda a, b: rms_norm(a, b, 1e-6), x, w, grad_out=grad_out)
    y_ref, (gx_ref, gw_ref) = float64_grads(lambda a, b: reference_rms_norm(a, b, 1e-6), x, w, grad_out=grad_out)
    assert y.dtype == gx.dtype == gw.dtype == dtype
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        torch.testing.assert_close(got.double(), want, **tolerance(dtype))


def test_rms_norm_kernel_gives_only_the_gradients_asked_for():
    x, w = torch.randn(6, 9), torch.randn(9)
    _, r = cpu_dense.rms_norm_forward(x, w, 1e-6)
    assert cpu_dense.rms_norm_backward(torch.ones(6, 9), x, r, w, False, True)[0] is None
    assert cpu_dense.rms_norm_backward(torch.ones(6, 9), x, r, w, True, False)[1] is None
    x_only = x.clone().requires_grad_(True)
    rms_norm(x_only, w, 1e-6).sum().backward()  # weight without grad
    assert x_only.grad is not None and w.grad is None


@pytest.mark.parametrize("rows", [301, 1])  # one row: the kernel runs one thread of the two asked for
def test_rms_norm_kernel_with_two_threads_equals_one_thread(rows):
    x, w, grad_out = torch.randn(rows, 40), torch.randn(40), torch.randn(rows, 40)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for _ in range(3):  # fresh partial-sum buffers, reused memory included
                results.append(our_grads(lambda a, b: rms_norm(a, b, 1e-5), x, w, grad_out=grad_out))
    finally:
        torch.set_num_threads(threads)
    _, (_, gw_ref) = float64_grads(lambda a, b: reference_rms_norm(a, b, 1e-5), x, w, grad_out=grad_out)
    (y1, (gx1, _)) = results[0]
    for y, (gx, gw) in results:
        assert torch.equal(y, y1) and torch.equal(gx, gx1)  # rows are independent
        torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5)  # partial sums per thread


def test_rms_norm_kernel_double_backward_takes_the_pytorch_formula():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))


# ------------------------------------------------------------------------------------------------ swiglu
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 336), (2600,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swiglu_kernel_matches_float64_forward_and_both_gradients(shape, dtype):
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(shape, generator=g) * 4).to(dtype), torch.randn(shape, generator=g).to(dtype)
    grad_out = torch.randn(shape, generator=g)
    assert cpu_dense.supports(a, b)
    h, (ga, gb) = our_grads(swiglu, a, b, grad_out=grad_out)
    h_ref, (ga_ref, gb_ref) = float64_grads(lambda p, q: F.silu(p) * q, a, b, grad_out=grad_out)
    assert h.dtype == ga.dtype == gb.dtype == dtype
    for got, want in ((h, h_ref), (ga, ga_ref), (gb, gb_ref)):
        torch.testing.assert_close(got.double(), want, **tolerance(dtype))


def test_swiglu_kernel_is_exact_where_the_fast_exp_does_not_reach():
    """Blocks of 1,024 elements holding a value beyond ±87.5 (where the float exp approximation would over- or
    underflow) or a non-finite one are recomputed with std::exp: the same values as PyTorch, NaN and ±inf
    included, and the other blocks untouched."""
    a = torch.randn(3000) * 3
    a[5], a[1500], a[1501], a[1502], a[2999] = 100.0, -100.0, float("nan"), float("inf"), -88.0
    b, grad_out = torch.randn(3000), torch.randn(3000)
    h, (ga, gb) = our_grads(swiglu, a, b, grad_out=grad_out)
    h_ref, (ga_ref, gb_ref) = our_grads(lambda p, q: F.silu(p.double()) * q.double(), a, b, grad_out=grad_out)
    for got, want in ((h, h_ref), (ga, ga_ref), (gb, gb_ref)):
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.isnan(h[1501]) and torch.isinf(h[1502]) and h[1500].abs() < 1e-30


def test_swiglu_falls_back_for_other_layouts_and_dtypes():
    a, b = torch.randn(4, 6), torch.randn(6, 4).t()  # b is a transposed view
    assert not cpu_dense.supports(a, b)
    torch.testing.assert_close(swiglu(a, b), F.silu(a) * b)
    half = torch.randn(4, 6).bfloat16()
    assert not cpu_dense.supports(half, half) and swiglu(half, half).dtype == torch.bfloat16


def test_swiglu_kernel_double_backward_takes_the_pytorch_formula():
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(swiglu, (a, b))


# ------------------------------------------------------------------------------------------------ rotary split
@pytest.mark.parametrize("heads", [(4, 4, 4), (4, 2, 2), (6, 1, 1)])
@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_split_matches_float64_forward_and_gradient(heads, start, dtype):
    B, T, hd = 2, 5, 6
    rope = RotaryEmbedding(hd, max_seq_len=16)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, T, sum(heads) * hd, generator=g).to(dtype)
    grads_out = [torch.randn(B, T, h, hd, generator=g) for h in heads]
    leaf = qkv.clone().requires_grad_(True)
    q, k, v = rope.rotate_qkv(leaf, heads, start)
    got = torch.autograd.grad((q, k, v), leaf, [gr.to(dtype) for gr in grads_out])[0]
    cos, sin = rope.cos[start : start + T], rope.sin[start : start + T]

    def reference(t):
        hq, hk, hv = heads
        parts = t.view(B, T, hq + hk + hv, hd).split(list(heads), dim=2)
        return reference_rotate(parts[0], cos, sin), reference_rotate(parts[1], cos, sin), parts[2]

    ref_leaf = qkv.double().requires_grad_(True)
    refs = reference(ref_leaf)
    want = torch.autograd.grad(refs, ref_leaf, [gr.double() for gr in grads_out])[0]
    for out, ref in zip((q, k, v), refs):
        assert out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.double(), ref, **tolerance(dtype))
    torch.testing.assert_close(got.double(), want, **tolerance(dtype))


def test_rotary_split_takes_strided_gradients_and_double_backward():
    rope = RotaryEmbedding(4, max_seq_len=8)
    qkv = torch.randn(2, 3, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    q, k, v = rope.rotate_qkv(qkv, (2, 2, 2), 1)
    strided = [torch.randn(2, 2, 3, 4, dtype=torch.float64).transpose(1, 2) for _ in range(3)]  # as SDPA returns
    got = torch.autograd.grad((q, k, v), qkv, strided, retain_graph=True)[0]
    want = torch.autograd.grad((q, k, v), qkv, [s.contiguous() for s in strided])[0]
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda t: rope.rotate_qkv(t, (2, 2, 2), 1), (qkv,))
    assert torch.autograd.gradgradcheck(lambda t: rope.rotate_qkv(t, (2, 2, 2), 1), (qkv,))


def test_rotary_split_refuses_positions_past_the_table_and_declines_other_inputs():
    rope = RotaryEmbedding(4, max_seq_len=6)
    with pytest.raises(ValueError, match="reaches position 8 but the model's max_seq_len is 6"):
        rope.rotate_qkv(torch.randn(1, 4, 12), (1, 1, 1), 4)
    assert rope.rotate_qkv(torch.randn(1, 4, 12).bfloat16(), (1, 1, 1), 0) is None
    assert rope.rotate_qkv(torch.randn(1, 12, 4).transpose(1, 2), (1, 1, 1), 0) is None


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_with_the_rotary_kernel_equals_the_pytorch_rotation(n_kv_heads, monkeypatch):
    torch.manual_seed(0)
    attention = CausalSelfAttention(32, 4, 16, n_kv_heads=n_kv_heads)
    x, grad_out = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(RotaryEmbedding, "rotate_qkv", lambda self, *args: None)
        leaf = x.clone().requires_grad_(True)
        attention.zero_grad()
        y = attention(leaf)
        y.backward(grad_out)
        results.append((y, leaf.grad, attention.qkv.weight.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ fallback
def test_without_the_kernels_the_pytorch_paths_give_the_same_results(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, w, a, b = torch.randn(5, 12, generator=g), torch.randn(12, generator=g), torch.randn(4, 9, generator=g), \
        torch.randn(4, 9, generator=g)
    qkv = torch.randn(2, 3, 12, generator=g)
    rope = RotaryEmbedding(4, max_seq_len=8)
    outputs = []
    for disabled in (False, True):
        with kernels_switched(cpu_dense, monkeypatch, off=disabled), warnings.catch_warnings():
            warnings.simplefilter("error")  # the switch turns them off without a warning
            assert cpu_dense.available() != disabled
            norm = our_grads(lambda p, q: rms_norm(p, q, 1e-6), x, w, grad_out=torch.ones(5, 12))
            glu = our_grads(swiglu, a, b, grad_out=torch.ones(4, 9))
            split = rope.rotate_qkv(qkv, (1, 1, 1), 2)
            assert (split is None) == disabled
            outputs.append((norm, glu))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_meta_and_fake_tensors_take_the_pytorch_path():
    from torch._subclasses.fake_tensor import FakeTensorMode

    rope = RotaryEmbedding(4, max_seq_len=8)
    with FakeTensorMode():
        x, w, qkv = torch.randn(3, 8), torch.randn(8), torch.randn(2, 3, 12)
        assert not cpu_dense.supports(x, w)
        assert rms_norm(x, w, 1e-6).shape == (3, 8) and swiglu(x, x).shape == (3, 8)
        assert rope.rotate_qkv(qkv, (1, 1, 1), 0) is None
    meta = torch.randn(3, 8, device="meta")
    assert rms_norm(meta, torch.ones(8, device="meta"), 1e-6).device.type == "meta"
    assert swiglu(meta, meta).shape == (3, 8)


def test_empty_inputs_keep_their_shapes():
    assert rms_norm(torch.randn(3, 0), torch.ones(0), 1e-6).shape == (3, 0)
    assert rms_norm(torch.randn(0, 5), torch.ones(5), 1e-6).shape == (0, 5)
    assert swiglu(torch.randn(0, 4), torch.randn(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rms_normalize_with_a_scale_matches_float64_forward_and_gradient(dtype):
    """``rms_normalize(x, scale=s)`` (the router's qk-norm: rms_norm with a constant gain) against float64."""
    x = torch.randn(3, 5, 2, 24, dtype=torch.float64)
    x[0, 0, 0] = 0.0  # a zero vector: eps keeps it finite
    grad = torch.randn_like(x)
    xd = x.to(dtype).requires_grad_()
    y = rms_normalize(xd, scale=24**-0.5)
    assert y.dtype == dtype
    y.backward(grad.to(dtype))
    x64 = xd.detach().double().requires_grad_()
    want = reference_rms_norm(x64, torch.full((24,), 24**-0.5, dtype=torch.float64), 1e-6)
    want.backward(grad.to(dtype).double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(xd.grad.double(), x64.grad, rtol=tol, atol=tol)
    small = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: rms_normalize(t, scale=0.5), (small,))


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_norm_matches_float64_forward_and_all_gradients(kind, dtype):
    """HeadNorm (fused norm, then the per-head gain and bias) against a float64 formula."""
    norm = HeadNorm(3, 16, kind).to(dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = (torch.randn(4, 7, 3, 16, dtype=dtype) + 0.5).requires_grad_()
    grad = torch.randn(4, 7, 3, 16, dtype=dtype)
    got = torch.autograd.grad(norm(x), [x, *norm.parameters()], grad)
    x64 = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in norm.parameters()]
    centred = x64 - x64.mean(-1, keepdim=True) if kind == "layernorm" else x64
    want_y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * params[0]
    if kind == "layernorm":
        want_y = want_y + params[1]
    want = torch.autograd.grad(want_y, [x64, *params], grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(norm(x).double(), want_y, rtol=tol, atol=tol)
    for name, g, w in zip(["x", "weight", "bias"], got, want):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
