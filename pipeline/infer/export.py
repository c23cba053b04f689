"""ONNX export of MobileSAM: the image encoder, and the prompt encoder + mask decoder.

Two models per checkpoint and input size, each with a JSON sidecar (same name, ``.json``)
that says what it is: the model, input size, checkpoint SHA-256, samstream and torch
versions, opset, and every input and output with its shape and meaning.

- ``image_encoder``: ``images`` Bx3xSxS float32, *already normalised and zero-padded*
  bottom-right to SxS (what ``MobileSAM.preprocess`` gives; ``pipeline.infer.encoder.preprocess``
  does it on the host) -> ``embeddings`` Bx256x(S/16)x(S/16). The batch is dynamic; S is fixed
  per file (TinyViT's window padding is traced for it).
- ``mask_decoder``: one image's embedding, N prompts of K points each (both dynamic) ->
  ``low_res_logits`` Nx1x(S/4)x(S/4) and ``scores`` Nx1 (the single-mask output the tracker
  uses). Prompts follow segment-anything's ONNX exporter: a box is two corner points with
  labels 2 (top-left) and 3 (bottom-right), points have labels 1 / 0, label -1 pads (a
  prompt without a box needs one padding point: ``onnx_prompts`` builds the arrays), and a
  mask prompt is used where ``has_mask_input`` is 1.

The cache (``cached_onnx``) exports a model on first use under the weights cache directory
(the encoder for ``encoder.backend``, the decoder for ``tracker.backend``) and reuses it
while its key (checkpoint SHA-256, input size, opset, torch and samstream versions)
matches; a corrupt file is exported again with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.sam import MobileSAM, SamDecoder

log = logging.getLogger(__name__)

OPSET = 17  # the classic exporter's opset that ONNX Runtime and OpenVINO both run well
SIDECAR_FORMAT = "samstream-onnx/1"
ENCODER = "image_encoder"
DECODER = "mask_decoder"
ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("embeddings",)
DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
)
DECODER_OUTPUTS = ("low_res_logits", "scores")
# The decoder graph's revision: 2 = DecoderOnnxModel's reordered arithmetic (shared work once
# per call, channels-last upscaling); 1 (no "graph" in the key) = MobileSAM.decode's order.
DECODER_GRAPH = 2
# mkstemp makes files private (0600); exported models are no secret and may be shared.
FILE_MODE = 0o644


def samstream_version() -> str:
    """The installed samstream version ("0+unknown" when run from a tree never installed)."""
    try:
        return importlib.metadata.version("samstream")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(model_path: str | os.PathLike[str]) -> Path:
    return Path(model_path).with_suffix(".json")


class DecoderOnnxModel(nn.Module):
    """MobileSAM's prompt encoder + mask decoder with array prompts: what the ONNX decoder
    and the tracker's torch decoder backend (``pipeline.infer.mask_decoder``) run.

    Inputs: image_embeddings 1xCxhxw; point_coords NxKx2 float32 (x, y) pixels in the
    resized input frame; point_labels NxK float32 (1 fg, 0 bg, 2 box top-left, 3 box
    bottom-right, -1 padding); mask_input Nx1x(4h)x(4w) low-res logits (or 1x1x(4h)x(4w)
    zeros when unused); has_mask_input (1,) float32, 1 to use mask_input, 0 to ignore it.
    Outputs: low_res_logits Nx1x(4h)x(4w), scores Nx1 (mask token 0: single-mask output).

    The function is MobileSAM.decode's, the arithmetic reordered so that the work per
    prompt shrinks (the tracker's cost grows with the number of objects). CPU time of 8 box
    + mask prompts at 1024 px on one thread, measured: 580 ms in PyTorch against
    MobileSAM.decode's 1030-1240, 316 ms in ONNX Runtime against 551 for the plain graph.
    Every step is exact algebra, so the outputs match MobileSAM.decode to float32 rounding
    (measured 5e-7 to 9e-7 relative):

    - the first block's image-side projections (its token->image keys and values, its
      image->token queries) are linear in the image tokens, and the mask prompt enters them
      through the prompt encoder's last, linear 1x1 conv: they are projected once per call
      for the shared image embedding, plus a 16-channel term per mask prompt (folded
      weights) instead of a 256-channel projection per prompt;
    - token->image attention of the later blocks projects the few query tokens through the
      key weights instead of all 4096 image tokens through them (q.(W x + b) =
      (W^T q).x + q.b, the q.b term being constant along the softmax axis), and takes the
      softmax-weighted sum of the raw image tokens before the value projection (rows of
      the softmax sum to 1);
    - image->token attention folds its output projection into the token values
      (softmax(.) V W^T), and in the second block its query projection into the token keys;
    - only mask token 0's hypernetwork and mask are computed (the single-mask output).

    upscale_with_matmuls: the output upscaling's transposed convolutions as matmuls on
    channels-last pixels (`_upscaled_masks`), what is exported: CPU time at 1024 px, 8
    prompts, 1 thread, measured 333 vs 431 ms in OpenVINO and 310 vs 325 ms in ONNX Runtime
    against the convolutions; False keeps the convolutions (on a channels-last view), which
    PyTorch's oneDNN kernels run faster (701 vs 775 ms).
    """

    def __init__(self, *, model: SamDecoder, upscale_with_matmuls: bool = True) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.upscale_with_matmuls = upscale_with_matmuls

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        embedding = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, pe.not_a_point_embed.weight, embedding)
        # Labels 0-3 index the learned offsets: background, foreground, box corners.
        for i, offset in enumerate(pe.point_embeddings):
            embedding = embedding + torch.where(labels == i, offset.weight, 0.0)
        return embedding

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe, md = self.prompt_encoder, self.mask_decoder
        transformer = md.transformer
        first, second = transformer.layers
        h, w = image_embeddings.shape[-2:]
        sparse = self._embed_points(point_coords, point_labels)
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        prompt = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)

        # The dense prompt: has * conv1x1(features) + (has * bias + (1 - has) * no_mask).
        conv = pe.mask_downscaling[-1]
        has = has_mask_input.reshape(1, 1, 1)
        features = pe.mask_downscaling[:-1](mask_input).flatten(2).transpose(1, 2) * has
        conv_w = conv.weight.reshape(conv.weight.shape[0], -1)  # C x 16
        dense0 = has[0] * conv.bias + (1 - has[0]) * pe.no_mask_embed.weight  # 1 x C
        x = image_embeddings.flatten(2).transpose(1, 2)  # 1 x HW x C, shared
        pos = pe.get_dense_pe().flatten(2).transpose(1, 2)
        shared = x + dense0
        keys = _add_product(shared, features, conv_w.T)  # M x HW x C (M: mask prompts, 1 or N)

        # Block 1 (its self-attention has no residual and no positional term).
        queries = first.norm1(first.self_attn(prompt, prompt, prompt))
        attn = first.cross_attn_token_to_image
        k = _linear_split(shared + pos, features, attn.k_proj, conv_w)
        v = _linear_split(shared, features, attn.v_proj, conv_w)
        q = _heads(attn.q_proj(queries + prompt), attn.num_heads) * _scale(attn)
        scores = q @ _heads(k, attn.num_heads).transpose(-1, -2)
        out = _merge(scores.softmax(dim=-1) @ _heads(v, attn.num_heads))
        queries = first.norm2(queries + attn.out_proj(out))
        queries = first.norm3(queries + first.mlp(queries))
        attn = first.cross_attn_image_to_token
        image_q = _linear_split(shared + pos, features, attn.q_proj, conv_w)  # M x HW x (H d)
        token_k = _heads(attn.k_proj(queries + prompt), attn.num_heads) * _scale(attn)
        scores = image_q @ _block_diagonal(token_k)  # N x HW x (H T)
        keys = first.norm4(_image_to_token(keys, scores, queries, attn))

        # Block 2.
        q = queries + prompt
        queries = second.norm1(queries + second.self_attn(q, q, queries))
        keys_pos = keys + pos if _exporting() else None
        attn = second.cross_attn_token_to_image
        queries = second.norm2(
            queries + _token_to_image(queries + prompt, keys, pos, attn, keys_pos=keys_pos)
        )
        queries = second.norm3(queries + second.mlp(queries))
        attn = second.cross_attn_image_to_token
        # scores = (W_q (keys + pos) + b_q) . k = keys . (W_q^T k) + (pos . (W_q^T k) + b_q . k)
        heads = attn.num_heads
        token_k = _heads(attn.k_proj(queries + prompt), heads) * _scale(attn)  # N x H x T x d
        wq = attn.q_proj.weight.reshape(heads, -1, attn.q_proj.weight.shape[1])  # H x d x C
        folded = (wq.transpose(1, 2) @ token_k.transpose(-1, -2)).permute(0, 2, 1, 3).flatten(2)
        bias = (attn.q_proj.bias.reshape(heads, 1, -1) @ token_k.transpose(-1, -2)).flatten(1)
        if keys_pos is not None:
            scores = keys_pos @ folded + bias[:, None]
        else:
            scores = _add_product(_shared_product(pos, folded) + bias[:, None], keys, folded)
        keys = second.norm4(_image_to_token(keys, scores, queries, attn))

        # The final token->image attention.
        attn = transformer.final_attn_token_to_image
        queries = transformer.norm_final_attn(
            queries + _token_to_image(queries + prompt, keys, pos, attn)
        )

        hyper = md.output_hypernetworks_mlps[0](queries[:, 1, :])  # mask token 0
        if self.upscale_with_matmuls:
            masks = _upscaled_masks(md.output_upscaling, keys, hyper, h, w)
        else:
            # N x HW x C viewed as NCHW without a copy (channels-last strides).
            image = keys.reshape(-1, h, w, keys.shape[-1]).permute(0, 3, 1, 2)
            upscaled = md.output_upscaling(image)
            masks = (hyper[:, None, :] @ upscaled.flatten(2)).reshape(-1, 1, 4 * h, 4 * w)
        scores_out = md.iou_prediction_head(queries[:, 0, :])[:, :1]
        return masks, scores_out


def _upscaled_masks(
    upscaling: nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """MaskDecoder's output upscaling and hypernetwork product, channels-last.

    Its two transposed convolutions have kernel 2 and stride 2: each input pixel makes its
    own 2x2 output block, so each is one matmul of the pixels' channels with the kernel
    (C x (2 2 C')), the 2x2 blocks kept as extra axes; the LayerNorm is then over the last
    axis, and only the final N x 4h x 4w masks are rearranged into image order. The same
    arithmetic as the convolutions, without their NCHW transposes. keys: N x hw x C,
    hyper: N x C'' -> N x 1 x 4h x 4w.
    """
    conv1, norm, gelu1, conv2, gelu2 = upscaling
    n = keys.shape[0]
    c1, c2 = conv1.weight.shape[1], conv2.weight.shape[1]
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.weight.shape[0], 4 * c1)
    x = (keys @ w1).reshape(n, h * w * 4, c1) + conv1.bias  # (y, x, a, b) x C'
    x = gelu1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    x = gelu2((x @ w2).reshape(n, h * w * 16, c2) + conv2.bias)  # (y, x, a, b, a', b') x C''
    masks = (x @ hyper[:, :, None]).reshape(n, h, w, 2, 2, 2, 2)
    # Output row 4y + 2a + a', column 4x + 2b + b'.
    return masks.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 1, 4 * h, 4 * w)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """B x L x (H d) -> B x H x L x d."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """B x H x L x d -> B x L x (H d)."""
    return x.transpose(1, 2).flatten(2)


def _scale(attn: nn.Module) -> float:
    return float(attn.internal_dim // attn.num_heads) ** -0.5


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax over a short axis: the same function, 3x faster than torch's kernel over the
    7-odd prompt tokens (it is vectorised along the axis)."""
    e = (x - x.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim, keepdim=True)


def _block_diagonal(k: torch.Tensor) -> torch.Tensor:
    """N x H x T x d -> N x (H d) x (H T), head h's k^T in block (h, h): one matmul of the
    image queries with it gives every head's scores side by side."""
    n, heads, t, d = k.shape
    eye = torch.eye(heads, dtype=k.dtype, device=k.device)
    blocks = k.transpose(-1, -2)[:, :, :, None, :] * eye[None, :, None, :, None]
    return blocks.reshape(n, heads * d, heads * t)


def _exporting() -> bool:
    """Whether the graph is being traced for ONNX. Eager PyTorch runs the fused forms
    below (baddbmm; q . pos as one matmul for all prompts), which measured 17% less CPU
    time at 8 prompts; exported, they would become Expand copies and transposes that ONNX
    Runtime and OpenVINO run 12-25% slower than the plain sums they fuse themselves. Both
    are the same algebra."""
    return torch.onnx.is_in_onnx_export()


def _add_product(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base + a @ b, batched (a batch of 1 broadcast; b may be one matrix for all): in
    PyTorch one fused baddbmm, no separate pass over the sum."""
    if _exporting():
        return base + a @ b
    n = max(base.shape[0], a.shape[0], b.shape[0] if b.dim() == 3 else 1)
    b = b.expand(n, -1, -1) if b.dim() == 3 else b.expand(n, *b.shape)
    return torch.baddbmm(base.expand(n, -1, -1), a.expand(n, -1, -1), b)


def _shared_product(shared: torch.Tensor, per_prompt: torch.Tensor) -> torch.Tensor:
    """shared (1 x L x C) @ per_prompt (N x C x K) -> N x L x K, as one matmul over every
    prompt's columns (the shared rows are read once, not once per prompt)."""
    n, c, k = per_prompt.shape
    out = shared[0] @ per_prompt.permute(1, 0, 2).reshape(c, n * k)  # L x (N K)
    return out.reshape(-1, n, k).transpose(0, 1)


def _linear_split(
    shared: torch.Tensor, features: torch.Tensor, proj: nn.Linear, conv_w: torch.Tensor
) -> torch.Tensor:
    """proj(shared + conv_w features): the shared part projected once, the mask prompts'
    16 channels through the folded weights proj.weight @ conv_w."""
    return _add_product(proj(shared), features, (proj.weight @ conv_w).T)


def _image_to_token(
    keys: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor, attn: nn.Module
) -> torch.Tensor:
    """keys + out_proj(softmax(scores) @ V), the output projection folded into the token
    values: keys M x HW x C, scores N x HW x (H T) scaled, tokens N x T x C -> N x HW x C."""
    heads = attn.num_heads
    n, hw, _ = scores.shape
    probs = _softmax(scores.reshape(n, hw, heads, -1), dim=-1).flatten(2)
    v = _heads(attn.v_proj(tokens), heads)  # N x H x T x d
    wo = attn.out_proj.weight.reshape(attn.out_proj.weight.shape[0], heads, -1)  # C x H x d
    # Each head's probabilities sum to 1, all H T of them to H: the bias is spread over them.
    v_out = v @ wo.permute(1, 2, 0) + attn.out_proj.bias / heads  # N x H x T x C
    return _add_product(keys, probs, v_out.flatten(1, 2))


def _token_to_image(
    q_in: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    attn: nn.Module,
    *,
    keys_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token->image attention projecting the T query tokens, not the HW image tokens:
    q_in N x T x C (queries + their positional term), keys N x HW x C, pos 1 x HW x C ->
    N x T x C. In PyTorch q' . (keys + pos) is computed as q' . pos (one matmul for every
    prompt) plus q' . keys, without the N x HW x C sum; exported, from keys_pos = keys + pos
    when given (see `_exporting`)."""
    heads = attn.num_heads
    q = _heads(attn.q_proj(q_in), heads) * _scale(attn)  # N x H x T x d
    c = attn.k_proj.weight.shape[1]
    wk = attn.k_proj.weight.reshape(heads, -1, c)  # H x d x C
    q_keys = (q @ wk).flatten(1, 2)  # N x (H T) x C
    # q . b_k is the same for every image token: softmax does not see it.
    if _exporting():
        scores = q_keys @ (keys + pos if keys_pos is None else keys_pos).transpose(1, 2)
    else:
        to_pos = _shared_product(pos, q_keys.transpose(1, 2)).transpose(1, 2)  # N x (H T) x HW
        scores = _add_product(to_pos, q_keys, keys.transpose(1, 2))
    mixed = scores.softmax(dim=-1) @ keys  # N x (H T) x C; softmax rows sum to 1
    mixed = mixed.reshape(q.shape[0], heads, q.shape[2], c)
    wv = attn.v_proj.weight.reshape(heads, -1, c)  # H x d x C
    v = mixed @ wv.transpose(1, 2) + attn.v_proj.bias.reshape(heads, 1, -1)  # N x H x T x d
    return attn.out_proj(_merge(v))


def onnx_prompts(
    *,
    points: tuple[np.ndarray, np.ndarray] | None = None,
    boxes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MobileSAM.decode's prompts as the decoder ONNX model's (point_coords, point_labels).

    points: (NxKx2 coords, NxK labels 0/1) and/or boxes Nx4 (x1, y1, x2, y2), in the resized
    input frame. Returns NxK'x2 float32 and NxK' float32: the points, then the two box
    corners (labels 2, 3), or one padding point (label -1) when there is no box, the order
    and padding of the PyTorch prompt encoder.
    """
    if points is None and boxes is None:
        raise ValueError("onnx_prompts needs points or boxes (or both)")
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if points is not None:
        xy, lab = np.asarray(points[0], np.float32), np.asarray(points[1], np.float32)
        if xy.ndim != 3 or xy.shape[2] != 2 or lab.shape != xy.shape[:2]:
            raise ValueError(f"points must be (NxKx2, NxK), got {xy.shape} and {lab.shape}")
        coords.append(xy)
        labels.append(lab)
    if boxes is not None:
        box = np.asarray(boxes, np.float32)
        if box.ndim != 2 or box.shape[1] != 4:
            raise ValueError(f"boxes must be Nx4 (x1, y1, x2, y2), got {box.shape}")
        coords.append(box.reshape(-1, 2, 2))
        labels.append(np.broadcast_to(np.array([2, 3], np.float32), (len(box), 2)))
    else:
        n = coords[0].shape[0]
        coords.append(np.zeros((n, 1, 2), np.float32))
        labels.append(-np.ones((n, 1), np.float32))
    if len({c.shape[0] for c in coords}) != 1:
        raise ValueError("points and boxes must describe the same number of prompts")
    return np.concatenate(coords, axis=1), np.concatenate(labels, axis=1)


# What each input and output of the exported models is, for their sidecars ({s}: the input
# size).
MEANINGS = {
    "images": "RGB normalised with SAM's pixel mean/std, longest side resized to {s}, "
    "zero-padded bottom-right to {s}x{s}",
    "embeddings": "image embeddings for the mask decoder",
    "image_embeddings": "one image's embedding (the image encoder's output)",
    "point_coords": "(x, y) pixels in the resized input frame; a box is 2 corner points",
    "point_labels": "1 foreground, 0 background, 2 box top-left, 3 box bottom-right, "
    "-1 padding (one padding point when a prompt has no box)",
    "mask_input": "low-res mask logits of each prompt (mask_prompts = prompts), or "
    "1x1 zeros when has_mask_input is 0",
    "has_mask_input": "1: use mask_input as a mask prompt; 0: no mask prompt",
    "low_res_logits": "mask logits at a quarter of the padded input (threshold 0)",
    "scores": "predicted IoU of each mask",
}


def _io_description(model: SamDecoder, kind: str) -> tuple[list[dict], list[dict]]:
    """The `kind` model's inputs and outputs: name, shape, dtype (float32, all), meaning."""
    s, grid = model.img_size, model.embedding_size
    c, low = model.prompt_encoder.embed_dim, 4 * grid
    shapes: dict[str, list[int | str]] = {
        "images": ["batch", 3, s, s],
        "embeddings": ["batch", c, grid, grid],
        "image_embeddings": [1, c, grid, grid],
        "point_coords": ["prompts", "points", 2],
        "point_labels": ["prompts", "points"],
        "mask_input": ["mask_prompts", 1, low, low],
        "has_mask_input": [1],
        "low_res_logits": ["prompts", 1, low, low],
        "scores": ["prompts", 1],
    }

    def rows(names: tuple[str, ...]) -> list[dict]:
        return [
            {"name": n, "shape": shapes[n], "dtype": "float32", "meaning": MEANINGS[n].format(s=s)}
            for n in names
        ]

    if kind == ENCODER:
        return rows(ENCODER_INPUTS), rows(ENCODER_OUTPUTS)
    return rows(DECODER_INPUTS), rows(DECODER_OUTPUTS)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The classic exporter warns that it is deprecated, and the tracer that TinyViT's
    # window-padding branches become constants: both expected, since the input size is
    # fixed per exported file (and recorded in its sidecar).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        yield


def export_onnx(
    model: SamDecoder, path: str | os.PathLike[str], *, kind: str, opset: int = OPSET
) -> None:
    """Write the `kind` (ENCODER or DECODER) part of `model` to `path` as ONNX (no sidecar).
    The decoder exports from a decoder-only `SamDecoder` too; the encoder needs a MobileSAM.

    Uses the classic TorchScript exporter (dynamo=False): it handles timm's TinyViT and
    gives a graph that both ONNX Runtime and OpenVINO optimise well.
    """
    model = model.eval()
    device = model.device
    grid, c = model.embedding_size, model.prompt_encoder.embed_dim
    if kind == ENCODER:
        if not isinstance(model, MobileSAM):
            raise TypeError(
                f"the {ENCODER} export needs a MobileSAM, not a {type(model).__name__} "
                "(which has no image encoder)"
            )
        module: nn.Module = model.image_encoder
        args: tuple[torch.Tensor, ...] = (
            torch.zeros(1, 3, model.img_size, model.img_size, device=device),
        )
        names, outputs = ENCODER_INPUTS, ENCODER_OUTPUTS
        dynamic = {"images": {0: "batch"}, "embeddings": {0: "batch"}}
    elif kind == DECODER:
        module = DecoderOnnxModel(model=model).eval()
        # Traced with two prompts for one embedding, so that the decoder's "one image, many
        # prompts" expand is the branch recorded (with the prompt count as a dynamic size).
        args = (
            torch.zeros(1, c, grid, grid, device=device),
            torch.full((2, 3, 2), 8.0, device=device),
            torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]], device=device),
            torch.zeros(2, 1, 4 * grid, 4 * grid, device=device),
            torch.ones(1, device=device),
        )
        names, outputs = DECODER_INPUTS, DECODER_OUTPUTS
        dynamic = {
            "point_coords": {0: "prompts", 1: "points"},
            "point_labels": {0: "prompts", 1: "points"},
            "mask_input": {0: "mask_prompts"},
            "low_res_logits": {0: "prompts"},
            "scores": {0: "prompts"},
        }
    else:
        raise ValueError(f"kind must be {ENCODER!r} or {DECODER!r}, got {kind!r}")
    # inference_mode(False): the tracer cannot record inference tensors, and a caller may be
    # inside inference mode (SAM.encode_batch is).
    with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(names),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def sidecar(
    model: SamDecoder, *, kind: str, checkpoint_sha256: str, opset: int, file_sha256_hex: str
) -> dict[str, Any]:
    """The JSON sidecar of an exported model: its cache key plus what a reader needs."""
    inputs, outputs = _io_description(model, kind)
    return {
        **export_key(
            kind=kind, image_size=model.img_size, checkpoint_sha256=checkpoint_sha256, opset=opset
        ),
        "inputs": inputs,
        "outputs": outputs,
        "file_sha256": file_sha256_hex,
    }


def export_key(
    *, kind: str, image_size: int, checkpoint_sha256: str, opset: int = OPSET
) -> dict[str, Any]:
    """What an exported file depends on: a cached file with another key is never used.

    The decoder's also names its graph revision (DECODER_GRAPH): a decoder cached from an
    older graph computes the same function more slowly, and is exported again."""
    key = {
        "format": SIDECAR_FORMAT,
        "model": kind,
        "image_size": image_size,
        "checkpoint_sha256": checkpoint_sha256,
        "samstream_version": samstream_version(),
        "torch_version": torch.__version__,
        "opset": opset,
    }
    if kind == DECODER:
        key["graph"] = DECODER_GRAPH
    return key


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write, moved onto `path` (mode
    FILE_MODE) when the block ends without an error: readers see all of it or none."""
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f"{path.suffix}.part", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON at `path`, through a temporary file (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_model(
    model: SamDecoder,
    path: str | os.PathLike[str],
    *,
    kind: str,
    checkpoint_sha256: str,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Export `kind` to `path` through a temporary file, check it, then write its sidecar.

    The model file is moved into place complete, and the sidecar (with the file's SHA-256)
    only after it: a file without a matching sidecar is never trusted. Returns the sidecar.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        export_onnx(model, tmp, kind=kind, opset=opset)
        onnx.checker.check_model(str(tmp))
        digest = file_sha256(tmp)
    info = sidecar(
        model, kind=kind, checkpoint_sha256=checkpoint_sha256, opset=opset, file_sha256_hex=digest
    )
    atomic_write_json(sidecar_path(path), info)
    return info


def export_models(
    model: MobileSAM, out_dir: str | os.PathLike[str], *, checkpoint_sha256: str, opset: int = OPSET
) -> dict[str, Path]:
    """Both models into `out_dir`: mobile_sam_{image_encoder,mask_decoder}_{S}.onnx + .json."""
    out = Path(out_dir)
    paths = {}
    for kind in (ENCODER, DECODER):
        path = out / f"mobile_sam_{kind}_{model.img_size}.onnx"
        start = time.perf_counter()
        write_model(model, path, kind=kind, checkpoint_sha256=checkpoint_sha256, opset=opset)
        log.info("exported %s (%.1f s)", path, time.perf_counter() - start)
        paths[kind] = path
    return paths


# ---------------------------------------------------------------------------------------------
# The cache: each model exported once per checkpoint and input size, reused after.


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _export_lock(path: Path) -> Iterator[None]:
    """Serialise exports of one file between processes (two runs starting at once)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic renames still keep files whole
        yield
        return
    with open(path.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached_problem(path: Path, key: dict[str, Any]) -> tuple[str, str] | None:
    """Why the cached `path` cannot be used: ("missing" | "stale" | "corrupt", detail)."""
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        return "missing", "not exported yet"
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
        found = {k: info.get(k) for k in key}  # a key it lacks: an older format, stale
        digest = info["file_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return "corrupt", f"unreadable sidecar {side.name}: {err!r}"
    if found != key:
        changed = sorted(k for k in key if found[k] != key[k])
        return "stale", f"made for another {', '.join(changed)}"
    if file_sha256(path) != digest:
        return "corrupt", "its SHA-256 does not match the one recorded at export"
    return None


def cached_onnx(
    model: SamDecoder,
    *,
    kind: str,
    checkpoint_sha256: str,
    cache: str | os.PathLike[str] | None = None,
) -> Path:
    """The `kind` model of `model` as a cached ONNX file, exported on first use.

    Lives in `cache` (default: the weights cache dir, pipeline.model.weights.cache_dir())
    under onnx/, named by a hash of its key; reused only when the sidecar's key matches and
    the file's SHA-256 is the one recorded, otherwise exported again (a warning for a
    corrupt file).
    """
    if cache is None:
        from pipeline.model.weights import cache_dir

        cache = cache_dir()
    key = export_key(kind=kind, image_size=model.img_size, checkpoint_sha256=checkpoint_sha256)
    path = Path(cache) / "onnx" / f"{kind}-{model.img_size}-{_key_hash(key)}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_lock(path):
        problem = _cached_problem(path, key)
        if problem is None:
            log.debug("using cached %s", path)
            return path
        what, detail = problem
        if what == "corrupt":
            log.warning("cached ONNX model %s is corrupt (%s): exporting it again", path, detail)
        elif what == "stale":
            log.info("cached ONNX model %s is stale (%s): exporting it again", path, detail)
        log.info(
            "exporting the MobileSAM %s at %d px to ONNX, once per checkpoint and size "
            "(a few seconds) -> %s",
            kind,
            model.img_size,
            path,
        )
        start = time.perf_counter()
        write_model(model, path, kind=kind, checkpoint_sha256=checkpoint_sha256)
        log.info("exported %s in %.1f s", path.name, time.perf_counter() - start)
    return path
