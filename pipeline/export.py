"""ONNX export of MobileSAM: the image encoder, and the prompt encoder + mask decoder.

Two models per checkpoint and input size, each with a JSON sidecar (same name, ``.json``)
that says what it is: the model, input size, checkpoint SHA-256, samstream and torch
versions, opset, and every input and output with its shape and meaning.

- ``image_encoder``: ``images`` Bx3xSxS float32, *already normalised and zero-padded*
  bottom-right to SxS (what ``MobileSAM.preprocess`` gives; ``pipeline.backends.preprocess``
  does it in numpy) -> ``embeddings`` Bx256x(S/16)x(S/16). The batch is dynamic; S is fixed
  per file (TinyViT's window padding is traced for it).
- ``mask_decoder``: one image's embedding, N prompts of K points each (both dynamic) ->
  ``low_res_logits`` Nx1x(S/4)x(S/4) and ``scores`` Nx1 (the single-mask output the tracker
  uses). Prompts follow segment-anything's ONNX exporter: a box is two corner points with
  labels 2 (top-left) and 3 (bottom-right), points have labels 1 / 0, label -1 pads (a
  prompt without a box needs one padding point: ``onnx_prompts`` builds the arrays), and a
  mask prompt is used where ``has_mask_input`` is 1.

The cache (``cached_encoder_onnx``) exports the encoder on first use under the weights
cache directory and reuses it while its key (checkpoint SHA-256, input size, opset, torch and
samstream versions) matches; a corrupt file is exported again with a warning.
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
from torch import nn

from pipeline.model.sam import MobileSAM

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
    """MobileSAM's prompt encoder + mask decoder with array prompts, for ONNX export.

    Inputs: image_embeddings 1xCxhxw; point_coords NxKx2 float32 (x, y) pixels in the
    resized input frame; point_labels NxK float32 (1 fg, 0 bg, 2 box top-left, 3 box
    bottom-right, -1 padding); mask_input Nx1x(4h)x(4w) low-res logits (or 1x1x(4h)x(4w)
    zeros when unused); has_mask_input (1,) float32, 1 to use mask_input, 0 to ignore it.
    Outputs: low_res_logits Nx1x(4h)x(4w), scores Nx1 (mask token 0: single-mask output).
    The arithmetic is MobileSAM.decode's, so the outputs match it to float rounding.
    """

    def __init__(self, *, model: MobileSAM) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

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
        pe = self.prompt_encoder
        sparse = self._embed_points(point_coords, point_labels)
        has_mask = has_mask_input.reshape(1, 1, 1, 1)
        dense = pe.mask_downscaling(mask_input) * has_mask
        dense = dense + (1 - has_mask) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        masks, scores = self.mask_decoder.predict_masks(
            image_embeddings, pe.get_dense_pe(), sparse, dense
        )
        return masks[:, :1], scores[:, :1]


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


def _io_description(model: MobileSAM, kind: str) -> tuple[list[dict], list[dict]]:
    s, grid = model.img_size, model.image_encoder.embedding_size
    c, low = model.prompt_encoder.embed_dim, 4 * grid
    f32 = "float32"
    if kind == ENCODER:
        return (
            [
                {
                    "name": "images",
                    "shape": ["batch", 3, s, s],
                    "dtype": f32,
                    "meaning": "RGB normalised with SAM's pixel mean/std, longest side resized to "
                    f"{s}, zero-padded bottom-right to {s}x{s}",
                }
            ],
            [
                {
                    "name": "embeddings",
                    "shape": ["batch", c, grid, grid],
                    "dtype": f32,
                    "meaning": "image embeddings for the mask decoder",
                }
            ],
        )
    return (
        [
            {
                "name": "image_embeddings",
                "shape": [1, c, grid, grid],
                "dtype": f32,
                "meaning": "one image's embedding (the image encoder's output)",
            },
            {
                "name": "point_coords",
                "shape": ["prompts", "points", 2],
                "dtype": f32,
                "meaning": "(x, y) pixels in the resized input frame; a box is 2 corner points",
            },
            {
                "name": "point_labels",
                "shape": ["prompts", "points"],
                "dtype": f32,
                "meaning": "1 foreground, 0 background, 2 box top-left, 3 box bottom-right, "
                "-1 padding (one padding point when a prompt has no box)",
            },
            {
                "name": "mask_input",
                "shape": ["mask_prompts", 1, low, low],
                "dtype": f32,
                "meaning": "low-res mask logits of each prompt (mask_prompts = prompts), or "
                "1x1 zeros when has_mask_input is 0",
            },
            {
                "name": "has_mask_input",
                "shape": [1],
                "dtype": f32,
                "meaning": "1: use mask_input as a mask prompt; 0: no mask prompt",
            },
        ],
        [
            {
                "name": "low_res_logits",
                "shape": ["prompts", 1, low, low],
                "dtype": f32,
                "meaning": "mask logits at a quarter of the padded input (threshold 0)",
            },
            {
                "name": "scores",
                "shape": ["prompts", 1],
                "dtype": f32,
                "meaning": "predicted IoU of each mask",
            },
        ],
    )


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
    model: MobileSAM, path: str | os.PathLike[str], *, kind: str, opset: int = OPSET
) -> None:
    """Write the `kind` (ENCODER or DECODER) part of `model` to `path` as ONNX (no sidecar).

    Uses the classic TorchScript exporter (dynamo=False): it handles timm's TinyViT and
    gives a graph that both ONNX Runtime and OpenVINO optimise well.
    """
    model = model.eval()
    device = model.device
    grid, c = model.image_encoder.embedding_size, model.prompt_encoder.embed_dim
    if kind == ENCODER:
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
    model: MobileSAM, *, kind: str, checkpoint_sha256: str, opset: int, file_sha256_hex: str
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
    """What an exported file depends on: a cached file with another key is never used."""
    return {
        "format": SIDECAR_FORMAT,
        "model": kind,
        "image_size": image_size,
        "checkpoint_sha256": checkpoint_sha256,
        "samstream_version": samstream_version(),
        "torch_version": torch.__version__,
        "opset": opset,
    }


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON at `path`, through a temporary file: readers see all of it or none."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_model(
    model: MobileSAM,
    path: str | os.PathLike[str],
    *,
    kind: str,
    checkpoint_sha256: str,
    opset: int = OPSET,
    check: bool = True,
) -> dict[str, Any]:
    """Export `kind` to `path` through a temporary file, check it, then write its sidecar.

    The model file is moved into place complete, and the sidecar (with the file's SHA-256)
    only after it: a file without a matching sidecar is never trusted. Returns the sidecar.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_onnx(model, tmp, kind=kind, opset=opset)
        if check:
            import onnx

            onnx.checker.check_model(str(tmp))
        digest = file_sha256(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
# The cache: the encoder exported once per checkpoint and input size, reused after.


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
    model: MobileSAM,
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
