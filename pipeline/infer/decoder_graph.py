"""The mask decoder graph that the tracker's torch backend runs and the ONNX export traces:
MobileSAM's prompt encoder + mask decoder with array prompts (`DecoderOnnxModel`), its
arithmetic reordered so that the work per prompt shrinks, and the prompt arrays it takes
(`onnx_prompts`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.sam import SamDecoder

# The decoder graph's revision: 2 = DecoderOnnxModel's reordered arithmetic (shared work once
# per call, channels-last upscaling); 1 (no "graph" in the key) = MobileSAM.decode's order.
DECODER_GRAPH = 2


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
