"""The tracker's mask decoder backends: torch, ONNX Runtime and OpenVINO behind one
interface, and `auto` (``tracker.backend``).

The tracker's cost grows with its objects: every object is one prompt through MobileSAM's
prompt encoder + mask decoder, ~50 ms each at 1024 px in torch on one CPU core. Every
backend here runs the same function, one frame's prompts in one call: one image embedding
1xCxhxw and N prompts (boxes and/or points in the resized input frame, an optional
low-res mask prompt each) -> low-res logits Nx1x(4h)x(4w) and scores Nx1, float32
(`DecoderBackend.decode`). The upscaling to the frame stays in torch
(``pipeline.infer.mask_decoder``).

- ``torch``: ``pipeline.infer.export.DecoderOnnxModel`` run in PyTorch, MobileSAM.decode's
  function with its arithmetic reordered so that work shared by the prompts is done once
  (exact algebra; ~1e-6 relative from MobileSAM.decode). ``TorchDecoder(exact=True)`` is
  MobileSAM.decode itself, bit for bit ``SAM.decode``: the parity reference, and what
  ``SamMaskDecoder`` runs when given no backend.
- ``onnxruntime``, ``openvino``: that model exported to ONNX once per checkpoint and size
  (``pipeline.infer.export.cached_onnx``, dynamic prompt and point counts), fp32 (OpenVINO's
  precision hint set to f32: it would pick bf16 by itself on CPUs with native bf16).

`auto` is the encoder's calibration (``pipeline.infer.backends.calibrate``, cached the same way)
given the decoder's candidates and inputs: it times every installed candidate on this
machine at the run's size and thread count on 1 and 8 box + mask prompts, parity-checks it
against MobileSAM.decode in fp32 (low-res logits within `TOLERANCE` relative), and keeps
the fastest (the sum of both timings). Reduced precision is not a candidate: the tracker
feeds each mask back as the next frame's mask prompt, so errors compound over frames
(OpenVINO bf16 measured 1.3e-2 relative error on the logits). On a GPU, `auto` is torch.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.infer.backends import (
    _OV_PRECISION,
    BACKENDS,
    Backend,
    Calibration,
    _Candidate,
    _import,
    autocast,
    calibration_key,
    candidate,
    choose_backend,
    compile_openvino,
    encoder_threads,
    torch_dtype,
)
from pipeline.model.sam import SamDecoder

log = logging.getLogger(__name__)

SETTING = "tracker.backend"
# Largest relative error (Frobenius norm) of the low-res logits vs MobileSAM.decode in fp32.
# Measured on random weights at 256 and 1024 px: torch (reordered) 5e-7, ONNX Runtime and
# OpenVINO 6e-7 to 9e-7.
TOLERANCE = 1e-4
CALIBRATION_FORMAT = "samstream-decoder-calibration/1"
CALIBRATION_COUNTS = (1, 8)  # prompts per timed call: one object, and a crowded scene
CANDIDATES = ("torch", "onnxruntime", "openvino")


class DecoderBackend(Backend):
    """One way to run the prompt encoder + mask decoder on one frame's prompts."""

    def __init__(self, *, model: SamDecoder, precision: str, threads: int, version: str) -> None:
        self.low_size = tuple(model.prompt_encoder.mask_input_size)
        super().__init__(
            image_size=model.img_size, precision=precision, threads=threads, version=version
        )

    def decode(
        self,
        embedding: torch.Tensor,
        *,
        boxes: np.ndarray | None = None,
        points: tuple[np.ndarray, np.ndarray] | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call for N prompts of one kind.

        embedding: 1xCxhxw float32; boxes Nx4 (x1, y1, x2, y2) and/or points (NxKx2 coords,
        NxK labels 1/0), in the resized input frame's pixels; mask_input Nx1x(4h)x(4w)
        low-res logits or None. Returns low-res logits Nx1x(4h)x(4w) and scores Nx1,
        float32, on the embedding's device.
        """
        raise NotImplementedError


class TorchDecoder(DecoderBackend):
    """The decoder in PyTorch on the model's device.

    exact: False runs ``DecoderOnnxModel`` (the shared work done once: ~2x less per prompt
    at 1024 px, ~1e-6 relative from MobileSAM.decode); True runs MobileSAM.decode, bit for
    bit what ``SAM.decode`` gives. precision: float32, or bfloat16 / float16 under autocast
    (the tracker's SAM dtype). threads: None leaves torch's intra-op pool as it is (sized
    from $OMP_NUM_THREADS in a node process); a number sets it, for the whole process.
    """

    name = "torch"

    def __init__(
        self,
        *,
        model: SamDecoder,
        precision: str = "float32",
        threads: int | None = None,
        exact: bool = False,
    ) -> None:
        from pipeline.infer.export import DecoderOnnxModel

        self.model = model
        self.exact = exact
        self.dtype = torch_dtype(precision, model.device, threads)
        self.network = DecoderOnnxModel(model=model, upscale_with_matmuls=False).eval()
        super().__init__(
            model=model,
            precision=precision,
            threads=torch.get_num_threads(),
            version=torch.__version__,
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "graph": "MobileSAM.decode" if self.exact else "reordered"}

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        *,
        boxes: np.ndarray | None = None,
        points: tuple[np.ndarray, np.ndarray] | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.device
        if self.exact:
            box_t = None if boxes is None else torch.from_numpy(boxes).to(device)
            point_t = None
            if points is not None:
                point_t = (
                    torch.from_numpy(points[0]).to(device),
                    torch.from_numpy(points[1]).to(device),
                )
            with autocast(self.model.device, self.dtype):
                low, scores = self.model.decode(
                    embedding, points=point_t, boxes=box_t, mask_inputs=mask_input
                )
            return low.float(), scores.float()
        from pipeline.infer.export import onnx_prompts

        coords, labels = onnx_prompts(points=points, boxes=boxes)
        has = torch.ones(1, device=device)
        if mask_input is None:
            mask_input = torch.zeros(1, 1, *self.low_size, device=device)
            has = torch.zeros(1, device=device)
        with autocast(self.model.device, self.dtype):
            low, scores = self.network(
                embedding,
                torch.from_numpy(coords).to(device),
                torch.from_numpy(labels).to(device),
                mask_input,
                has,
            )
        return low.float(), scores.float()


class _OnnxDecoder(DecoderBackend):
    """What the ONNX backends share: the prompts as the exported model's arrays."""

    def _feeds(
        self,
        embedding: torch.Tensor,
        boxes: np.ndarray | None,
        points: tuple[np.ndarray, np.ndarray] | None,
        mask_input: torch.Tensor | None,
    ) -> dict[str, np.ndarray]:
        from pipeline.infer.export import onnx_prompts

        if embedding.device.type != "cpu":
            raise ValueError(f"{SETTING} {self.name} runs on the CPU only")
        coords, labels = onnx_prompts(points=points, boxes=boxes)
        if mask_input is None:
            masks = np.zeros((1, 1, *self.low_size), np.float32)
            has = np.zeros(1, np.float32)
        else:
            masks = np.ascontiguousarray(mask_input.detach().float().numpy())
            has = np.ones(1, np.float32)
        return {
            "image_embeddings": np.ascontiguousarray(embedding.detach().float().numpy()),
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": masks,
            "has_mask_input": has,
        }

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def decode(
        self,
        embedding: torch.Tensor,
        *,
        boxes: np.ndarray | None = None,
        points: tuple[np.ndarray, np.ndarray] | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        low, scores = self._run(self._feeds(embedding, boxes, points, mask_input))
        return torch.from_numpy(low), torch.from_numpy(scores)


class OnnxRuntimeDecoder(_OnnxDecoder):
    """The exported decoder in ONNX Runtime's CPU provider, fp32, `threads` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, *, model: SamDecoder, path: str | os.PathLike[str], threads: int) -> None:
        ort = _import("onnxruntime", SETTING)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # a chain of operators: a second pool only competes
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise RuntimeError(
                f"ONNX Runtime cannot load {path}: {err}; delete the file to export it again"
            ) from err
        super().__init__(model=model, precision="float32", threads=threads, version=ort.__version__)

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        low, scores = self.session.run(None, feeds)
        return low, scores


class OpenVinoDecoder(_OnnxDecoder):
    """The exported decoder in OpenVINO's CPU plugin at an explicit inference precision
    (float32 for the tracker; bfloat16 only for `samstream bench`'s figures)."""

    name = "openvino"

    def __init__(
        self,
        *,
        model: SamDecoder,
        path: str | os.PathLike[str],
        threads: int,
        precision: str = "float32",
    ) -> None:
        ov = _import("openvino", SETTING)
        if precision not in _OV_PRECISION:
            raise ValueError(f"openvino runs {' or '.join(_OV_PRECISION)}, not {precision}")
        config = {
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self.compiled = compile_openvino(ov, path, config)
        self.request = self.compiled.create_infer_request()
        super().__init__(model=model, precision=precision, threads=threads, version=ov.__version__)

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.request.infer(feeds)
        # The output buffers belong to the request and are overwritten by the next call.
        low = np.array(self.request.get_output_tensor(0).data, copy=True)
        scores = np.array(self.request.get_output_tensor(1).data, copy=True)
        return low, scores


def make_decoder(
    backend: str,
    *,
    model: SamDecoder,
    checkpoint_sha256: str | None,
    threads: int | None,
    cache: Path | None,
    precision: str = "float32",
) -> DecoderBackend:
    """One named backend (torch, onnxruntime, openvino), exporting the decoder on first use."""
    if backend == "torch":
        return TorchDecoder(model=model, precision=precision, threads=threads)
    if backend not in CANDIDATES:
        raise ValueError(f"{SETTING} {backend!r} is not one of {' | '.join(BACKENDS)}")
    _import(backend, SETTING)  # the install hint before any export work
    if checkpoint_sha256 is None:
        raise ValueError(f"{SETTING} {backend} needs the checkpoint's SHA-256 for its export")
    from pipeline.infer.export import DECODER, cached_onnx

    path = cached_onnx(model, kind=DECODER, checkpoint_sha256=checkpoint_sha256, cache=cache)
    budget = encoder_threads(threads, what="tracker")
    if backend == "onnxruntime":
        if precision != "float32":
            raise ValueError(f"{SETTING} onnxruntime runs float32 only, not {precision}")
        return OnnxRuntimeDecoder(model=model, path=path, threads=budget)
    return OpenVinoDecoder(model=model, path=path, threads=budget, precision=precision)


# ---------------------------------------------------------------------------------------------
# Calibration.


def calibration_prompts(
    model: SamDecoder, count: int, *, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The calibration and parity inputs: (a 1xCxhxw embedding, `count` boxes Nx4 of
    100-300 px (at 1024) over a 4:3 input frame, Nx1x(4h)x(4w) mask-prompt logits).

    Deterministic, so that every backend sees the same numbers; real-valued like an
    encoder's output and a previous frame's logits (blobs with texture), no file needed.
    """
    rng = np.random.default_rng(seed)
    s, grid = model.img_size, model.embedding_size
    low = 4 * grid
    embedding = rng.standard_normal((1, model.prompt_encoder.embed_dim, grid, grid))
    scale = s / 1024
    boxes = []
    for _ in range(count):
        w, h = rng.uniform(100, 300, 2) * scale
        x, y = rng.uniform(0, s - w), rng.uniform(0, 0.75 * s - h)
        boxes.append([x, y, x + w, y + h])
    box_arr = np.asarray(boxes, np.float32)
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float32) + 0.5
    masks = []
    for x1, y1, x2, y2 in box_arr * (low / s):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        blob = 12 * (1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2)
        masks.append(np.maximum(blob + rng.normal(0, 1.0, blob.shape), -20))
    device = model.device
    return (
        torch.from_numpy(embedding.astype(np.float32)).to(device),
        box_arr,
        torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(device),
    )


def _candidates() -> list[_Candidate]:
    return [candidate(backend, "float32", TOLERANCE) for backend in CANDIDATES]


def _low_res(
    decoder: DecoderBackend, inputs: tuple[torch.Tensor, np.ndarray, torch.Tensor]
) -> np.ndarray:
    """One calibration call: the box + mask prompts' low-res logits, compared for parity."""
    embedding, boxes, masks = inputs
    return decoder.decode(embedding, boxes=boxes, mask_input=masks)[0].cpu().numpy()


def decoder_calibration_key(
    *, image_size: int, threads: int, checkpoint_sha256: str
) -> dict[str, Any]:
    """The mask decoder's `pipeline.infer.backends.calibration_key`: also its prompt counts and
    tolerance."""
    return calibration_key(
        CALIBRATION_FORMAT,
        image_size=image_size,
        threads=threads,
        checkpoint_sha256=checkpoint_sha256,
        counts=list(CALIBRATION_COUNTS),
        tolerance=TOLERANCE,
    )


def _auto(
    *, model: SamDecoder, checkpoint_sha256: str, threads: int | None, cache: Path
) -> DecoderBackend:
    budget = encoder_threads(threads, what="tracker")

    def make(backend: str, precision: str) -> DecoderBackend:
        return make_decoder(
            backend,
            model=model,
            checkpoint_sha256=checkpoint_sha256,
            threads=threads,
            cache=cache,
            precision=precision,
        )

    calibration = Calibration(
        what="tracker mask decoder",
        name="decoder",
        key=decoder_calibration_key(
            image_size=model.img_size, threads=budget, checkpoint_sha256=checkpoint_sha256
        ),
        image_size=model.img_size,
        threads=budget,
        precisions=("float32",),
        candidates=_candidates,
        inputs={
            str(n): functools.partial(calibration_prompts, model, n, seed=n)
            for n in CALIBRATION_COUNTS
        },
        run=_low_res,
        make=make,
        # MobileSAM.decode itself: the torch candidate is the reordered graph.
        reference=functools.partial(TorchDecoder, model=model, threads=threads, exact=True),
        unit="prompts",
    )
    decoder, chosen = choose_backend(calibration, cache)
    decoder.report = {
        **decoder.describe(),
        "device": "cpu",
        "requested": {"backend": "auto"},
        **chosen,
    }
    return decoder


def build_decoder(
    *,
    model: SamDecoder,
    weights_path: str | os.PathLike[str],
    backend: str = "torch",
    threads: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    precision: str = "float32",
) -> DecoderBackend:
    """The tracker's mask decoder backend for `model` (on its device), `report` saying why.

    backend: auto | torch | onnxruntime | openvino. threads: intra-op threads (None: the
    node's budget, see `pipeline.infer.backends.encoder_threads`; torch's pool is then left as
    it is). cache: where exports and calibrations live (default: the weights cache dir).
    precision: torch's autocast dtype (float32 unless the tracker's SAM is in another).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{SETTING} {backend!r} is not one of {' | '.join(BACKENDS)}")
    device = model.device
    if device.type != "cpu":
        if backend in ("onnxruntime", "openvino"):
            raise ValueError(
                f"{SETTING} {backend} runs on the CPU only; with device {device} use "
                f"{SETTING} torch or auto"
            )
        decoder: DecoderBackend = TorchDecoder(model=model, precision=precision)
        decoder.report = {
            **decoder.describe(),
            "device": str(device),
            "requested": {"backend": backend},
            "chosen_by": "auto on a GPU is torch" if backend == "auto" else "config",
        }
        return decoder
    if cache is None:
        from pipeline.model.weights import cache_dir

        cache = cache_dir()
    cache = Path(cache)
    if backend == "torch":
        decoder = TorchDecoder(model=model, precision=precision, threads=threads)
    else:
        if backend != "auto":
            _import(backend, SETTING)  # the install hint before hashing the checkpoint
        from pipeline.infer.export import file_sha256

        checkpoint_sha256 = file_sha256(weights_path)
        if backend == "auto":
            return _auto(
                model=model, checkpoint_sha256=checkpoint_sha256, threads=threads, cache=cache
            )
        decoder = make_decoder(
            backend, model=model, checkpoint_sha256=checkpoint_sha256, threads=threads, cache=cache
        )
    decoder.report = {
        **decoder.describe(),
        "device": "cpu",
        "requested": {"backend": backend},
        "chosen_by": "config",
    }
    log.info(
        "tracker mask decoder backend %s at %d px, %d threads",
        decoder.name,
        model.img_size,
        decoder.threads,
    )
    return decoder
