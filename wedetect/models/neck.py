"""CSPRepBiFPAN neck: fuses the four ConvNeXt stages into P3/P4/P5 (strides 8/16/32).

Attribute names (``reduce_layer0``, ``Bifusion0``, ``Rep_p4``...) are the official checkpoint's.
Every BatchNorm here uses torch's default eps 1e-5 (the head uses 1e-3).
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBNAct(nn.Module):
    """Conv (no bias, same padding) -> BatchNorm -> ReLU or SiLU; weights under ``block.{conv,bn}``."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, act: str = "relu") -> None:
        super().__init__()
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False))
        self.block.add_module("bn", nn.BatchNorm2d(cout))
        self.block.add_module("act", nn.ReLU() if act == "relu" else nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Transpose(nn.Module):
    """Exact 2x learned upsampling (ConvTranspose2d k2 s2, with bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample_transpose(x)


class BottleRep(nn.Module):
    """Two 3x3 ConvBNSiLU with a learned-scale residual: ``conv2(conv1(x)) + alpha * x``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels, 3, act="silu")
        self.conv2 = ConvBNAct(channels, channels, 3, act="silu")
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + self.alpha * x


class RepBlock(nn.Module):
    """``n // 2`` BottleReps: the first as ``conv1``, the rest in ``block``."""

    def __init__(self, channels: int, n: int) -> None:
        super().__init__()
        self.conv1 = BottleRep(channels)
        self.block = nn.Sequential(*(BottleRep(channels) for _ in range(n // 2 - 1))) if n // 2 > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.block(x) if self.block is not None else x


class BepC3(nn.Module):
    """CSP block: ``cv3(cat[m(cv1(x)), cv2(x)])`` with a RepBlock of ``n // 2`` BottleReps in ``m``."""

    def __init__(self, cin: int, cout: int, n: int) -> None:
        super().__init__()
        hidden = int(cout * 0.5)
        self.cv1 = ConvBNAct(cin, hidden, 1, act="silu")
        self.cv2 = ConvBNAct(cin, hidden, 1, act="silu")
        self.cv3 = ConvBNAct(2 * hidden, cout, 1, act="silu")
        self.m = RepBlock(hidden, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


class BiFusion(nn.Module):
    """Fuse a coarser map (upsampled), a same-scale map and a finer map (downsampled)."""

    def __init__(self, in_lateral: int, in_fine: int, channels: int) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(in_lateral, channels, 1)
        self.cv2 = ConvBNAct(in_fine, channels, 1)
        self.cv3 = ConvBNAct(3 * channels, channels, 1)
        self.upsample = Transpose(channels)
        self.downsample = ConvBNAct(channels, channels, 3, stride=2)

    def forward(self, coarse: torch.Tensor, lateral: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        up = self.upsample(coarse)
        mid = self.cv1(lateral)
        down = self.downsample(self.cv2(fine))
        return self.cv3(torch.cat([up, mid, down], dim=1))


class CSPRepBiFPANNeck(nn.Module):
    """Takes (c1, c2, c3, c4) at strides 4/8/16/32 and returns [P3, P4, P5]."""

    def __init__(self, scale: float, repeats: tuple[int, ...]) -> None:
        super().__init__()
        ch = [int(c * scale) for c in (64, 128, 256, 512, 1024, 256, 128, 128, 256, 256, 512)]
        self.reduce_layer0 = ConvBNAct(ch[4], ch[5], 1)
        self.Bifusion0 = BiFusion(ch[3], ch[2], ch[5])
        self.Rep_p4 = BepC3(ch[5], ch[5], repeats[5])
        self.reduce_layer1 = ConvBNAct(ch[5], ch[6], 1)
        self.Bifusion1 = BiFusion(ch[2], ch[1], ch[6])
        self.Rep_p3 = BepC3(ch[6], ch[6], repeats[6])
        self.downsample2 = ConvBNAct(ch[6], ch[7], 3, stride=2)
        self.Rep_n3 = BepC3(ch[6] + ch[7], ch[8], repeats[7])
        self.downsample1 = ConvBNAct(ch[8], ch[9], 3, stride=2)
        self.Rep_n4 = BepC3(ch[5] + ch[9], ch[10], repeats[8])
        self.out_channels = (ch[6], ch[8], ch[10])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        c1, c2, c3, c4 = feats
        fpn_out0 = self.reduce_layer0(c4)
        f_out0 = self.Rep_p4(self.Bifusion0(fpn_out0, c3, c2))
        fpn_out1 = self.reduce_layer1(f_out0)
        p3 = self.Rep_p3(self.Bifusion1(fpn_out1, c2, c1))
        p4 = self.Rep_n3(torch.cat([self.downsample2(p3), fpn_out1], dim=1))
        p5 = self.Rep_n4(torch.cat([self.downsample1(p4), fpn_out0], dim=1))
        return [p3, p4, p5]
