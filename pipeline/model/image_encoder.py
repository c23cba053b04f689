"""MobileSAM's image encoder: a TinyViT-5M backbone with a SAM neck.

Built from timm's TinyViT pieces. The MobileSAM variant differs from stock TinyViT in three
ways, all handled here: the last patch merging keeps stride 1 (so the last stage stays at 1/16
of the input), there is no classifier head, and a neck maps the 320 channels to SAM's 256.

Every spatial size is derived from the input: a 1024x1024 input gives a 256x64x64 embedding,
512 gives 256x32x32, 768 gives 256x48x48.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.models.tiny_vit import ConvLayer, ConvNorm, PatchEmbed, TinyVitStage
from torch import nn

from pipeline.model.common import LayerNorm2d


class PatchMerging(nn.Module):
    """TinyViT patch merging (1x1 conv, depthwise 3x3 conv, 1x1 conv) with a chosen stride.

    timm's version always halves the resolution; MobileSAM's last merge keeps it (stride 1).
    Input and output are BxCxHxW.
    """

    def __init__(
        self,
        *,
        dim: int,
        out_dim: int,
        act_layer: type[nn.Module],
        stride: int = 2,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}  # timm's stages pass these through
        self.conv1 = ConvNorm(dim, out_dim, 1, 1, 0, **dd)
        self.act1 = act_layer()
        self.conv2 = ConvNorm(out_dim, out_dim, 3, stride, 1, groups=out_dim, **dd)
        self.act2 = act_layer()
        self.conv3 = ConvNorm(out_dim, out_dim, 1, 1, 0, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)


class TinyViTEncoder(nn.Module):
    """TinyViT backbone + SAM neck. Bx3xSxS (normalised, padded) -> Bx(out_chans)x(S/16)x(S/16)."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        self.img_size = img_size
        act_layer = nn.GELU
        self.patch_embed = PatchEmbed(in_chs=3, out_chs=embed_dims[0], act_layer=act_layer)

        stages: list[nn.Module] = [
            ConvLayer(
                dim=embed_dims[0],
                depth=depths[0],
                act_layer=act_layer,
                conv_expand_ratio=mbconv_expand_ratio,
            )
        ]
        last = len(embed_dims) - 1
        for i in range(1, len(embed_dims)):
            # The merge into the last stage keeps the resolution: the neck works at 1/16.
            stride = 1 if i == last else 2
            stages.append(
                TinyVitStage(
                    dim=embed_dims[i - 1],
                    out_dim=embed_dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    downsample=partial(PatchMerging, stride=stride),
                    local_conv_size=local_conv_size,
                    act_layer=act_layer,
                )
            )
        self.stages = nn.Sequential(*stages)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
        )

    @property
    def embedding_size(self) -> int:
        """Side of the square embedding grid: input size / 16."""
        return self.img_size // 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.stages(x)
        return self.neck(x)
