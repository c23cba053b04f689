"""Loading the official MobileSAM checkpoint (`mobile_sam.pt`) into this module tree.

Every difference between the official key layout and ours lives in `checkpoint_filter_fn`.
Loading is strict, goes through `torch.load(weights_only=True)` (a checkpoint that would run
code is refused) and lands on the CPU first.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from pipeline.model.sam import SamDecoder, build_sam_decoder

# Official keys that this model has no use for: TinyViT's ImageNet classifier.
_UNUSED_PREFIXES = ("image_encoder.head.", "image_encoder.norm_head.")
# The image encoder's keys: a decoder-only model (the tracker's) leaves them unread.
IMAGE_ENCODER_PREFIX = "image_encoder."


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded; the message names the file and the problem."""


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MobileSAM keys -> this package's module tree.

    - the unused classifier (`image_encoder.head.*`, `image_encoder.norm_head.*`) is dropped;
    - the official conv+BN pairs call the conv `c`, timm calls it `conv`;
    - the official patch embedding is a Sequential (`seq.0`, `seq.2`), timm's has names;
    - the official TinyViT puts each patch merging at the END of stage i (`layers.i.downsample`),
      timm puts it at the START of stage i+1 (`stages.{i+1}.downsample`).
    """
    # Some tools save {"model": state_dict}; accept that wrapper, nothing more exotic.
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_UNUSED_PREFIXES):
            continue
        if key.startswith("image_encoder."):
            key = key.replace("patch_embed.seq.0.", "patch_embed.conv1.")
            key = key.replace("patch_embed.seq.2.", "patch_embed.conv2.")
            key = re.sub(r"\.c\.(weight|bias)$", r".conv.\1", key)
            key = re.sub(
                r"^image_encoder\.layers\.(\d+)\.downsample\.",
                lambda m: f"image_encoder.stages.{int(m.group(1)) + 1}.downsample.",
                key,
            )
            key = re.sub(r"^image_encoder\.layers\.(\d+)\.", r"image_encoder.stages.\1.", key)
        out[key] = value
    return out


def _unpickler_reason(text: str) -> str:
    """The line of torch.load's error that says what was wrong (its first lines are a long
    note about the weights_only default)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            rest = line.split(marker, 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else ""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file onto the CPU, refusing anything that is not plain tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the path of mobile_sam.pt "
            "(or set SAMSTREAM_WEIGHTS)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a garbage file can fail the parser anywhere
        # Only a pickle that names a global (a class or function to call) would run code;
        # random bytes also fail the weights-only unpickler, but on a bad opcode.
        text = str(err)
        if "Weights only load failed" in text and "Unsupported global" in text:
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds Python objects that would run code "
                f"when loaded, not plain tensors ({_unpickler_reason(text)})"
            ) from err
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (a torch.save file of tensors): "
            f"{_unpickler_reason(text) or type(err).__name__}"
        ) from err
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__}, not a state dict of tensors"
        )
    return loaded


def load_checkpoint(model: nn.Module, path: str | Path, *, skip: tuple[str, ...] = ()) -> None:
    """Load an official-layout checkpoint into `model`, strictly, with errors that name the key.

    skip: key prefixes of networks that `model` does not have (IMAGE_ENCODER_PREFIX for a
    `SamDecoder`): left out unchecked. Every other key must match `model` exactly.
    """
    path = Path(path)
    state_dict = {
        key: value
        for key, value in checkpoint_filter_fn(read_state_dict(path)).items()
        if not key.startswith(skip)
    }
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is missing {len(missing)} key(s), first: {missing[0]!r} "
            "(is this a MobileSAM vit_t checkpoint?)"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} has {len(unexpected)} unexpected key(s), "
            f"first: {unexpected[0]!r} (is this a MobileSAM vit_t checkpoint?)"
        )
    for key, target in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: {key!r} is not a tensor")
        if value.shape != target.shape:
            raise CheckpointError(
                f"checkpoint {path}: {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(target.shape)}"
            )
    model.load_state_dict(state_dict, strict=True)


def load_sam_decoder(path: str | Path, *, img_size: int = 1024) -> SamDecoder:
    """The prompt encoder + mask decoder of an official-layout checkpoint, on the CPU, with no
    image encoder built (its weights are left unread); a checkpoint without all of their
    `prompt_encoder.*` and `mask_decoder.*` keys fails, naming the first one missing."""
    model = build_sam_decoder(img_size=img_size)
    load_checkpoint(model, path, skip=(IMAGE_ENCODER_PREFIX,))
    return model
