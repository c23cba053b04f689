"""The torch encoder's device-side work: preprocessing where the model is, and CUDA graphs.

Preprocessing (`upload`, then `device_preprocess`): uint8 frames go to the model's device
as they are (through pinned memory and a non-blocking copy on CUDA: 4x fewer bytes than
float, no per-frame float conversion on the host), and are resized (longest side to the
input size), normalised with SAM's constants, zero-padded to a square and cast to the
encoder's dtype there. Every function here runs on any device; on the CPU the tests compare
it with the host path (`pipeline.infer.encoder.preprocess` after PIL's resize).

`CudaGraphRunner` replays a function captured in one CUDA graph per input shape and dtype
(one per batch size and image size): a graph launches the encoder's few hundred kernels in
one call, which is what the launch-bound small batches need. Where a capture fails the
runner runs that shape eagerly and logs why.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.sam import PIXEL_MEAN, PIXEL_STD
from pipeline.model.transforms import resized_shape

log = logging.getLogger(__name__)

# Eager calls on a side stream before a capture: the first call allocates and picks
# kernels (cuDNN, cuBLAS workspaces), none of which may happen inside a capture.
WARMUP_CALLS = 3


def upload(frames: np.ndarray | Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Same-sized HxWx3 uint8 frames (or one BxHxWx3 array) -> BxHxWx3 uint8 on `device`.

    On CUDA the frames are stacked straight into page-locked memory (torch's caching host
    allocator reuses the block after the first frame, and keeps it until the copy is done)
    and copied without blocking the host, so the copy overlaps with queued GPU work. On the
    CPU an array that torch may share is used without a copy.
    """
    if len(frames) == 0:
        raise ValueError("upload needs at least one frame")
    shapes = {tuple(f.shape) for f in frames}
    shape = next(iter(shapes))
    if len(shapes) != 1 or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"upload needs same-sized HxWx3 frames, got {sorted(shapes)}")
    if any(f.dtype != np.uint8 for f in frames):
        raise ValueError(f"upload needs uint8 frames, got {sorted({str(f.dtype) for f in frames})}")
    if device.type != "cuda":
        if isinstance(frames, np.ndarray) and frames.flags.writeable:
            return torch.from_numpy(np.ascontiguousarray(frames))
        return torch.from_numpy(np.stack(list(frames)))
    staging = torch.empty((len(frames), *shape), dtype=torch.uint8, pin_memory=True)
    host = staging.numpy()
    for i, frame in enumerate(frames):
        host[i] = frame
    return staging.to(device, non_blocking=True)


def resize_longest_side(images: torch.Tensor, long_side: int) -> torch.Tensor:
    """Bx3xHxW float (0..255) -> Bx3xhxw float, max(h, w) == long_side, on its device.

    Bilinear with antialiasing (triangle filter widened by the scale when shrinking), which
    is PIL's BILINEAR, the reference's resize; rounded to whole levels, as PIL's uint8
    output is. PIL rounds between its horizontal and vertical passes too, so a level of
    difference remains on some pixels (tests/infer/test_device_preprocess.py bounds it).
    """
    h, w = resized_shape(images.shape[-2], images.shape[-1], long_side)
    if (h, w) == tuple(images.shape[-2:]):
        return images
    out = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255)


def normalise_and_pad(images: torch.Tensor, image_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Bx3xhxw float (0..255, h, w <= S) -> Bx3xSxS `dtype`: SAM's (x - mean) / std in
    float32 (also what pipeline.infer.encoder.preprocess runs), zero-padded bottom-right."""
    h, w = images.shape[-2:]
    if h > image_size or w > image_size:
        raise ValueError(
            f"images of {h}x{w} exceed the input size {image_size}; resize the longest side first"
        )
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = (images.float() - mean) / std
    return F.pad(x, (0, image_size - w, 0, image_size - h)).to(dtype).contiguous()


def device_preprocess(
    frames: torch.Tensor, *, image_size: int, dtype: torch.dtype, resize: bool = True
) -> tuple[torch.Tensor, tuple[int, int]]:
    """BxHxWx3 uint8 RGB (on any device) -> (Bx3xSxS `dtype` encoder input, (h, w) of the
    image inside it). resize: scale the longest side to S first (False: the frames are
    already resized, as `EncoderBackend.encode_images` takes them)."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8:
        raise ValueError(
            f"device_preprocess needs BxHxWx3 uint8 RGB, got {frames.dtype} {tuple(frames.shape)}"
        )
    images = frames.permute(0, 3, 1, 2).float()
    if resize:
        images = resize_longest_side(images, image_size)
    return normalise_and_pad(images, image_size, dtype), (images.shape[-2], images.shape[-1])


def half_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `module` with its weights in `dtype`, in eval mode.

    Half weights, not autocast over float32 ones alone: autocast would cast every weight on
    every call (and inside a CUDA graph, where its cast cache cannot be used, on every
    replay). Callers still run the copy under autocast, which keeps norms and softmax in
    fp32; its casts of half weights to half cost nothing.
    eval() after the cast: TinyViT caches attention biases in eval mode, and the official
    model's cache is a plain attribute that `.to()` does not convert.
    """
    return copy.deepcopy(module).to(dtype).eval()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: torch.Tensor


class CudaGraphRunner:
    """`fn` (Tensor -> Tensor, fixed work per input shape) replayed from CUDA graphs.

    One graph per (input shape, dtype, device), captured on first use after WARMUP_CALLS
    eager calls on a side stream. Each call copies its input into the graph's static input,
    replays, and returns a copy of the static output (the next replay overwrites it).
    A shape whose capture fails (an op that cannot be captured, out of memory) runs eagerly
    from then on; `failures` says why, and so does the log, once.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, _Graph] = {}
        self.failures: dict[tuple, str] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key in self.failures:
            return self.fn(x)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(x)
            except RuntimeError as err:  # torch reports capture errors as RuntimeError
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                self.failures[key] = reason
                log.warning("CUDA graph capture of %s failed (%s): running it eagerly", key, reason)
                return self.fn(x)
            self.graphs[key] = entry
        entry.static_input.copy_(x)
        entry.graph.replay()
        return entry.static_output.clone()

    def _capture(self, x: torch.Tensor) -> _Graph:
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA tensor, not one on {x.device}")
        static_input = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another node's thread (in-process runs) may use the GPU meanwhile;
        # its work is neither captured nor refused.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_output = self.fn(static_input)
        return _Graph(graph, static_input, static_output)
