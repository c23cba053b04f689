"""MobileSAM: image encoder + prompt encoder + mask decoder, with SAM's pre/post-processing;
SamDecoder: the prompt encoder + mask decoder alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.mask_decoder import MaskDecoder
from pipeline.model.prompt_encoder import PromptEncoder
from pipeline.model.transformer import TwoWayTransformer

if TYPE_CHECKING:
    # Imported where a MobileSAM is built: TinyViT comes from timm, whose import (with
    # torchvision's) takes seconds that a decoder-only process (the tracker) never needs.
    from pipeline.model.image_encoder import TinyViTEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class SamDecoder(nn.Module):
    """SAM's prompt encoder + mask decoder with their geometry and mask upscaling: all that
    decoding prompts against an image embedding needs, and no image encoder (the tracker
    builds only this). MobileSAM is this plus the image encoder.

    Prompts are in input-frame pixels (after the longest-side resize to `img_size`); masks
    leave as logits at any requested size.
    """

    mask_threshold: float = 0.0

    def __init__(self, *, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def img_size(self) -> int:
        """The padded input's side S that prompts are in."""
        return self.prompt_encoder.input_image_size[0]

    @property
    def embedding_size(self) -> int:
        """The image embedding's side (S/16); low-res logits are 4x that."""
        return self.prompt_encoder.image_embedding_size[0]

    @property
    def device(self) -> torch.device:
        return self.mask_decoder.iou_token.weight.device

    def decode(
        self,
        embeddings: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode every prompt against one image's embedding (1xCxhxw) in one batched call.

        Prompts are in input-frame pixels (after the longest-side resize). Returns low-res
        logits BxMx(4h)x(4w) and predicted IoU BxM, M = 3 with multimask_output else 1.
        """
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
        return self.mask_decoder(
            embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
        )

    def upscale_masks(
        self,
        low_res_logits: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """BxMxhxw low-res logits -> BxMxHxW logits at the original image size.

        Upscale to the padded input, crop the padding away, then resize to the original.
        """
        masks = F.interpolate(
            low_res_logits, (self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


class MobileSAM(SamDecoder):
    """The three networks: `SamDecoder` plus the image encoder, with its normalisation and
    padding.

    Images enter as Bx3xhxw (RGB, 0..255, already resized so the longest side equals
    `img_size`); masks leave as logits at any requested size.
    """

    def __init__(
        self,
        *,
        image_encoder: TinyViTEncoder,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        super().__init__(prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
        if image_encoder.img_size != self.img_size:
            raise ValueError(
                f"the image encoder's input side {image_encoder.img_size} is not the prompt "
                f"encoder's {self.img_size}"
            )
        self.image_encoder = image_encoder
        # Not in the checkpoint: the official model keeps these out of its state dict too.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xhxw RGB (any dtype, 0..255) -> normalised Bx3xSxS float, zero-padded bottom-right."""
        if images.shape[-1] > self.img_size or images.shape[-2] > self.img_size:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} exceed the input size {self.img_size}; "
                "resize the longest side first"
            )
        x = (images.float() - self.pixel_mean) / self.pixel_std
        pad_h = self.img_size - x.shape[-2]
        pad_w = self.img_size - x.shape[-1]
        return F.pad(x, (0, pad_w, 0, pad_h))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xhxw RGB 0..255 (longest side resized) -> BxCx(S/16)x(S/16) embeddings."""
        return self.image_encoder(self.preprocess(images))


def _decoder_networks(img_size: int) -> dict[str, nn.Module]:
    """The official prompt encoder and mask decoder for an input side that is a multiple of 16."""
    if img_size <= 0 or img_size % 16:
        raise ValueError(f"img_size must be a positive multiple of 16, got {img_size}")
    grid = img_size // 16
    return {
        "prompt_encoder": PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        "mask_decoder": MaskDecoder(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    }


def build_sam_decoder(*, img_size: int = 1024) -> SamDecoder:
    """The prompt encoder + mask decoder of the official architecture, without the image
    encoder (its weights: ``pipeline.model.checkpoint.load_sam_decoder``)."""
    return SamDecoder(**_decoder_networks(img_size))


def build_mobile_sam(*, img_size: int = 1024) -> MobileSAM:
    from pipeline.model.image_encoder import TinyViTEncoder

    """MobileSAM with the official architecture, at an input size that is a multiple of 16."""
    networks = _decoder_networks(img_size)
    return MobileSAM(image_encoder=TinyViTEncoder(img_size=img_size), **networks)
