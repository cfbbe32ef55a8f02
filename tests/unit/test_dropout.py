"""lmforge.kernels.dropout.Dropout: nn.Dropout with 16-bit keep-masks (kernels/dropout_mask.py) on CPU in training,
exactly nn.Dropout everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.kernels import cpu_kernels, dropout_mask
from lmforge.kernels.dropout import Dropout


@pytest.fixture(autouse=True)
def _restore_kernels():
    before = cpu_kernels.cpu_kernels()
    yield
    cpu_kernels.set_cpu_kernels(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_output_and_gradient_are_the_masked_scaled_input(dtype):
    x = torch.randn(4, 33, 48, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_(True)
    g = torch.randn(4, 33, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.manual_seed(3)
    y = Dropout(0.3).train()(x)
    y.backward(g)
    torch.manual_seed(3)
    keep = dropout_mask.keep_mask(x.shape, 0.3)
    scale = 1 / (1 - dropout_mask.drop_probability(0.3))
    assert y.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(y, (x.detach().float() * keep * scale).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, (g.float() * keep * scale).to(dtype), rtol=0, atol=0)
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - 0.3) < 0.03


def test_eval_zero_p_and_torch_kernels_are_nn_dropout():
    x = torch.randn(8, 16)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x
    cpu_kernels.set_cpu_kernels("torch")
    torch.manual_seed(5)
    ours = Dropout(0.5).train()(x)
    torch.manual_seed(5)
    assert torch.equal(ours, F.dropout(x, 0.5, True))
    assert isinstance(Dropout(0.1), torch.nn.Dropout) and not list(Dropout(0.1).state_dict())
