"""A worked example of a norm layer to submit: LayerNorm over the channels at every position.

ConvNeXt normalizes each pixel's channel vector (not the whole (C, H, W) sample as LayerNorm in
normbench does). Submit it with

    normbench check examples/channel_layernorm.py:ChannelLayerNorm
    normbench submit examples/channel_layernorm.py:ChannelLayerNorm --suite cifar-c --budget smoke

The contract: the constructor takes ``num_channels`` first; forward maps NCHW to NCHW of the same
shape and dtype; ``affine_parameters()`` lists the learnable scale and shift (they get no weight
decay). ``family`` and ``capabilities`` are shown on the leaderboard's Norm page.
"""

import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at each spatial position (as in ConvNeXt), per-channel affine."""

    family = "group"
    capabilities = {"affine"}

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 even for bfloat16 inputs: the variance of large values overflows
        # bfloat16's precision long before its range
        x32 = x.float()
        mean = x32.mean(dim=1, keepdim=True)
        var = x32.var(dim=1, keepdim=True, unbiased=False)
        y = ((x32 - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        scale, shift = (p.view(1, -1, 1, 1).to(x.dtype) for p in (self.weight, self.bias))
        return y * scale + shift

    def affine_parameters(self) -> list[nn.Parameter]:
        return [self.weight, self.bias]
