"""ConvNeXt image tower ("A ConvNet for the 2020s"), returning all four stage outputs.

Module names follow the original FAIR layout (``downsample_layers``, ``stages``, ``dwconv``,
``pwconv1``...) so official checkpoints map onto it by a prefix rename only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor.

    Written out op by op (mean, biased variance, rsqrt) in the official order rather than via
    ``F.layer_norm`` on a permuted tensor, so results agree with the official code to the last bit.
    Half-precision inputs are normalised in float32: the variance of large activations overflows fp16.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight.float()[:, None, None] * x + self.bias.float()[:, None, None]
        return x.to(dtype)


class Block(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> MLP (4x, exact GELU) -> layer scale -> residual."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        if x.dtype in (torch.float16, torch.bfloat16):  # fp32 statistics, as in LayerNorm2d
            x = F.layer_norm(x.float(), self.norm.normalized_shape, self.norm.weight.float(),
                             self.norm.bias.float(), self.norm.eps).to(shortcut.dtype)
        else:
            x = self.norm(x)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor: ``forward`` returns the outputs of the four stages (strides 4..32)."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], in_chans: int = 3) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        self.stages = nn.ModuleList(nn.Sequential(*(Block(d) for _ in range(n))) for n, d in zip(depths, dims))
        self.out_channels = tuple(dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            outs.append(x)
        return outs
