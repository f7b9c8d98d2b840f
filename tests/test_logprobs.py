"""rl.logprobs: chunked gather-minus-logsumexp equals log_softmax().gather, values and gradients,
in fp32 and bf16, and never makes a float32 tensor larger than one chunk of logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rl.logprobs import gather_logprobs, token_logprobs


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _data(b=3, t=7, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    select = torch.rand(b, t, generator=g) < 0.6
    return logits, targets, select


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_matches_log_softmax_gather_fp32(chunk_size):
    logits, targets, select = _data()
    out = token_logprobs(logits, targets, select, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    torch.testing.assert_close(out[select], _reference(logits, targets)[select], rtol=1e-6, atol=1e-5)
    assert (out[~select] == 0).all()
    # no selection = every position
    torch.testing.assert_close(token_logprobs(logits, targets, chunk_size=chunk_size), _reference(logits, targets),
                               rtol=1e-6, atol=1e-5)


def test_matches_reference_bf16():
    logits, targets, select = _data(dtype=torch.bfloat16)
    out = token_logprobs(logits, targets, select, chunk_size=3)
    assert out.dtype == torch.float32
    # same bf16 inputs, upcast once: agrees with the float32 reference to float32 precision
    torch.testing.assert_close(out[select], _reference(logits, targets)[select], rtol=1e-5, atol=1e-5)
    # and with a full-precision computation to bf16 input precision
    assert (out[select] - _reference(logits.double(), targets)[select]).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_matches_autograd_reference(dtype):
    logits, targets, select = _data(dtype=dtype, seed=1)
    coef = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    a = logits.clone().requires_grad_()
    (token_logprobs(a, targets, select, chunk_size=2) * coef).sum().backward()
    r = logits.clone().requires_grad_()
    (_reference(r, targets) * select * coef).sum().backward()
    assert a.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.grad.float(), r.grad.float(), rtol=tol, atol=tol)


def test_gradcheck_float64_both_saving_modes():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 5, (6,), generator=g)
    # 2 rows of 6 (a copy of the scored rows is saved) and 5 rows of 6 (the full logits are saved)
    for rows in (torch.tensor([4, 1]), torch.tensor([0, 5, 2, 3, 1])):
        assert torch.autograd.gradcheck(lambda x: gather_logprobs(x, rows, targets[rows], chunk_size=2), (logits,))


class _Float32Sizes(TorchDispatchMode):
    """Records the element count of every float32 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32:
                self.sizes.append(o.numel())
        return out


def test_llada_sized_vocab_only_chunk_sized_float32():
    """V = 126,464 (LLaDA): bf16 logits [2, 8, V], 6 scored positions, chunk of 2 positions.
    Forward and backward never create a float32 tensor larger than chunk_size x V."""
    v, chunk = 126_464, 2
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 8, v, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (2, 8), generator=g)
    select = torch.zeros(2, 8, dtype=torch.bool)
    select[0, 5:] = True
    select[1, 4:7] = True
    with _Float32Sizes() as rec:
        out = token_logprobs(logits, targets, select, chunk_size=chunk)
        out.sum().backward()
    assert max(rec.sizes) <= chunk * v < select.sum() * v
    ref = _reference(logits.detach()[select], targets[select])
    torch.testing.assert_close(out[select], ref, rtol=1e-5, atol=1e-5)
    assert logits.grad.shape == logits.shape and logits.grad.dtype == torch.bfloat16
    assert (logits.grad[~select] == 0).all() and logits.grad[select].abs().sum() > 0


def test_shape_errors_name_the_arguments():
    logits, targets, select = _data()
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:, :-1])
    with pytest.raises(ValueError, match="select"):
        token_logprobs(logits, targets, select[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, targets, chunk_size=0)
