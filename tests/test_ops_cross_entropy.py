"""The fused C++ cross-entropy (memzoo.ops.cpu_cross_entropy behind memzoo.nn.cross_entropy) against a plain float64
reference: loss and gradient, ignored labels, every label ignored, a vocabulary of one word and widths that are not a
multiple of the vector length, logits far below their row's maximum, non-finite logits, an incoming gradient other
than 1, a backward run twice (retain_graph), two threads, bad labels, and the PyTorch path it replaces."""

import pytest
import torch
import torch.nn.functional as F

from cpu_kernel_switch import kernels_switched
from memzoo.nn.constants import IGNORE_INDEX
from memzoo.nn.cross_entropy import cross_entropy
from memzoo.ops import cpu_cross_entropy


def reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean of ``logsumexp(x) - x[y]`` over the kept rows, in float64, from plain tensor ops."""
    x = logits.double()
    keep = labels != ignore_index
    rows = torch.logsumexp(x[keep], dim=-1) - x[keep].gather(1, labels[keep][:, None])[:, 0]
    return rows.sum() / keep.sum()


def loss_and_grad(fn, logits, labels, grad_out=1.0, dtype=None):
    x = logits.detach().to(dtype or logits.dtype).requires_grad_(True)
    loss = fn(x, labels)
    (loss * grad_out).backward()
    return loss.detach(), x.grad


def test_the_cross_entropy_kernel_builds_here():
    assert cpu_cross_entropy.available(), cpu_cross_entropy._KERNELS.state.get("error")


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 50), (256, 728)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradient_match_the_float64_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 4).to(dtype)
    labels = torch.randint(0, shape[1], shape[:1], generator=g)
    labels[1::5] = IGNORE_INDEX  # ignored rows (none when N == 1)
    labels[0] = shape[1] - 1  # the last word, and at least one kept row
    loss, grad = loss_and_grad(cross_entropy, logits, labels, grad_out=0.5)
    ref_loss, ref_grad = loss_and_grad(reference, logits, labels, grad_out=0.5, dtype=torch.float64)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)
    assert torch.count_nonzero(grad[labels == IGNORE_INDEX]) == 0


def test_it_agrees_with_torch_and_takes_the_kernel_on_plain_cpu_float_tensors():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(64, 33, generator=g), torch.randint(0, 33, (64,), generator=g)
    assert cpu_cross_entropy.supports(logits, labels)
    loss, grad = loss_and_grad(cross_entropy, logits, labels)
    torch_loss, torch_grad = loss_and_grad(lambda x, y: F.cross_entropy(x, y), logits, labels)
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(grad, torch_grad)
    assert not cpu_cross_entropy.supports(logits.t(), labels[:33])  # not contiguous: PyTorch's path
    assert not cpu_cross_entropy.supports(logits.half(), labels)
    assert not cpu_cross_entropy.supports(logits, labels.int())


def test_every_label_ignored_gives_nan_loss_and_zero_gradient_like_torch():
    logits, labels = torch.randn(4, 5), torch.full((4,), IGNORE_INDEX)
    loss, grad = loss_and_grad(cross_entropy, logits, labels)
    torch_loss, torch_grad = loss_and_grad(lambda x, y: F.cross_entropy(x, y), logits, labels)
    assert torch.isnan(loss) and torch.isnan(torch_loss)
    torch.testing.assert_close(grad, torch_grad)


def test_a_custom_ignore_index():
    logits, labels = torch.randn(6, 9), torch.tensor([1, 7, 7, 0, 8, 2])
    loss, grad = loss_and_grad(lambda x, y: cross_entropy(x, y, ignore_index=7), logits, labels)
    ref_loss, ref_grad = loss_and_grad(lambda x, y: reference(x, y, 7), logits, labels, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_logits_far_below_the_row_maximum_keep_tiny_probabilities_accurate():
    """Exponents under -87.5 (float32's polynomial range) are clamped: probabilities of ~1e-38, absolute error."""
    logits = torch.tensor([[0.0, -50.0, -90.0, -1e4, -3e38], [200.0, 100.0, -200.0, 0.0, 199.0]])
    labels = torch.tensor([2, 1])
    loss, grad = loss_and_grad(cross_entropy, logits, labels)
    ref_loss, ref_grad = loss_and_grad(reference, logits, labels, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=2e-38)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_give_nan_in_their_row_like_torch(bad):
    logits = torch.randn(3, 6)
    logits[1, 2] = bad
    labels = torch.tensor([0, 4, 5])
    rows = [cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(3)]
    torch_rows = [F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(3)]
    assert [bool(torch.isnan(r)) for r in rows] == [bool(torch.isnan(r)) for r in torch_rows] == [False, True, False]
    _, grad = loss_and_grad(cross_entropy, logits, labels)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()


def test_a_retained_graph_gives_the_same_gradient_on_every_backward():
    logits, labels = torch.randn(8, 11).requires_grad_(True), torch.randint(0, 11, (8,))
    loss = cross_entropy(logits, labels)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    second = torch.autograd.grad(loss * 3.0, logits, retain_graph=True)[0]
    third = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(second, 3 * first)
    assert torch.equal(third, first)


def test_a_double_backward_raises_instead_of_returning_a_wrong_gradient():
    logits, labels = torch.randn(4, 5).requires_grad_(True), torch.randint(0, 5, (4,))
    (grad,) = torch.autograd.grad(cross_entropy(logits, labels), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|differentiat"):
        grad.sum().backward()


def test_two_threads_give_the_one_thread_result_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(333, 101, generator=g), torch.randint(0, 101, (333,), generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grad(cross_entropy, logits, labels)
        torch.set_num_threads(2)
        two = loss_and_grad(cross_entropy, logits, labels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_no_gradient_is_written_when_none_is_needed():
    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(True), labels)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), reference(logits.detach(), labels), rtol=1e-6, atol=0)


@pytest.mark.parametrize("label", [-1, 7, 100])
def test_a_label_outside_the_vocabulary_names_itself(label):
    labels = torch.tensor([0, label, 3])
    with pytest.raises(IndexError, match=rf"label {label} at position 1 is outside the vocabulary \[0, 7\)"):
        cross_entropy(torch.randn(3, 7), labels)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"logits must be \(N, V\) and labels \(N,\)"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))


def test_with_the_kernels_off_it_is_torchs_cross_entropy(monkeypatch):
    logits, labels = torch.randn(9, 13), torch.randint(0, 13, (9,))
    labels[3] = IGNORE_INDEX
    with kernels_switched(cpu_cross_entropy, monkeypatch):
        assert not cpu_cross_entropy.supports(logits, labels)
        loss, grad = loss_and_grad(cross_entropy, logits, labels)
    torch_loss, torch_grad = loss_and_grad(lambda x, y: F.cross_entropy(x, y), logits, labels)
    assert torch.equal(loss, torch_loss) and torch.equal(grad, torch_grad)
