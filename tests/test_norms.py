"""Every registered norm against the basic contract (parametrized over the registry)."""

import functools

import pytest
import torch
from torch import nn

from normbench.norms import NORMS, affine_parameters, create_norm, group_count


@pytest.mark.parametrize("name", NORMS.names())
def test_norm_contract_basics(name):
    torch.manual_seed(0)
    norm = create_norm(name, 16)
    x = (torch.randn(4, 16, 8, 8) * 3 + 1).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = norm(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    params = {id(p) for p in norm.parameters()}
    assert {id(p) for p in affine_parameters(norm)} <= params
    norm.eval()
    with torch.no_grad():  # in eval mode a sample's output does not depend on its batch
        assert torch.allclose(norm(x[:1]), norm(x)[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NORMS.names() if NORMS.info(n).has("affine")])
def test_affine_norms_expose_scale_and_shift(name):
    norm = create_norm(name, 8)
    affine = affine_parameters(norm)
    # A scale and a shift at least; some zoo norms have more: FRN's TLU threshold, the gain of
    # sws_gn's standardized convolution, ConvNorm's depthwise affine convolution before its BN.
    assert len(affine) >= 2
    assert {id(p) for p in affine} <= {id(p) for p in norm.parameters()}


def test_normalizing_norms_normalize():
    x = torch.randn(8, 64, 6, 6) * 5 + 3
    for name, dims in (("batchnorm", (0, 2, 3)), ("instancenorm", (2, 3))):
        y = create_norm(name, 64)(x)
        assert y.mean(dims).abs().max() < 1e-4
    y = create_norm("layernorm", 64)(x)
    assert y.mean((1, 2, 3)).abs().max() < 1e-4


def test_group_count_rule():
    assert group_count(64) == 32
    assert group_count(48) == 16
    assert group_count(24) == 8
    assert create_norm("groupnorm", 48).num_groups == 16


def test_create_norm_accepts_class_and_partial():
    assert isinstance(create_norm(nn.BatchNorm2d, 4), nn.BatchNorm2d)
    gn = create_norm(functools.partial(nn.GroupNorm, 2), 4)
    assert gn.num_groups == 2 and gn.num_channels == 4
