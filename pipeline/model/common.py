"""Small layers shared by SAM's prompt encoder, mask decoder and the image encoder's neck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (not after the last). ...xC -> ...xD."""

    def __init__(
        self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x


class MLPBlock(nn.Module):
    """The transformer's feed-forward block: Linear -> ReLU -> Linear. ...xC -> ...xC."""

    def __init__(self, *, embedding_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NxCxHxW tensor (SAM's necks and mask upscaling),
    as timm's LayerNorm2d computes it (channels last, layer_norm, back). Ours, so that a
    process that only decodes (the tracker) need not import timm: with torchvision that is
    2-3 s of every start. Its parameters are ``weight`` and ``bias``, as SAM's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
