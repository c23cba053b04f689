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
  prompt without a box needs one padding point:
  ``pipeline.infer.decoder_graph.onnx_prompts`` builds the arrays), and a mask prompt is
  used where ``has_mask_input`` is 1. The graph is ``decoder_graph.DecoderOnnxModel``.

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
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.infer.decoder_graph import DECODER_GRAPH, DecoderOnnxModel
from pipeline.model.sam import MobileSAM, SamDecoder
from pipeline.outputs.atomic import AtomicFile, write_atomic

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
# Exported models are no secret and may be shared (the umask still applies).
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


# Each model's input and output names, in order.
IO_NAMES = {
    ENCODER: (ENCODER_INPUTS, ENCODER_OUTPUTS),
    DECODER: (DECODER_INPUTS, DECODER_OUTPUTS),
}


def _shapes(model: SamDecoder) -> dict[str, list[int | str]]:
    """Every input's and output's shape; a named dimension is dynamic in the export."""
    s, grid = model.img_size, model.embedding_size
    c, low = model.prompt_encoder.embed_dim, 4 * grid
    return {
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


def export_onnx(
    model: SamDecoder, path: str | os.PathLike[str], *, kind: str, opset: int = OPSET
) -> None:
    """Write the `kind` (ENCODER or DECODER) part of `model` to `path` as ONNX (no sidecar).
    The decoder exports from a decoder-only `SamDecoder` too; the encoder needs a MobileSAM.

    Uses the classic TorchScript exporter (dynamo=False): it handles timm's TinyViT and
    gives a graph that both ONNX Runtime and OpenVINO optimise well.
    """
    if kind not in IO_NAMES:
        raise ValueError(f"kind must be {ENCODER!r} or {DECODER!r}, got {kind!r}")
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
    else:
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
    names, outputs = IO_NAMES[kind]
    shapes = _shapes(model)
    dynamic = {
        name: {i: dim for i, dim in enumerate(shapes[name]) if isinstance(dim, str)}
        for name in (*names, *outputs)
        if any(isinstance(dim, str) for dim in shapes[name])
    }
    # inference_mode(False): the tracer cannot record inference tensors, and a caller may be
    # inside inference mode (SAM.encode_batch is).
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The classic exporter warns that it is deprecated, and the tracer that TinyViT's
        # window-padding branches become constants: both expected, since the input size is
        # fixed per exported file (and recorded in its sidecar).
        for category in (torch.jit.TracerWarning, DeprecationWarning, UserWarning):
            warnings.simplefilter("ignore", category=category)
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
    """The JSON sidecar of an exported model: its cache key plus what a reader needs (every
    input and output: name, shape, dtype (float32, all), meaning)."""
    shapes, s = _shapes(model), model.img_size

    def rows(names: tuple[str, ...]) -> list[dict]:
        return [
            {"name": n, "shape": shapes[n], "dtype": "float32", "meaning": MEANINGS[n].format(s=s)}
            for n in names
        ]

    inputs, outputs = IO_NAMES[kind]
    return {
        **export_key(
            kind=kind, image_size=model.img_size, checkpoint_sha256=checkpoint_sha256, opset=opset
        ),
        "inputs": rows(inputs),
        "outputs": rows(outputs),
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


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON at `path`, through a temporary file: readers see all of it or none."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode=FILE_MODE)


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
    start = time.perf_counter()
    with AtomicFile(path, mode=FILE_MODE) as out:
        out.file.close()  # the exporter writes the file by its path
        export_onnx(model, out.temp, kind=kind, opset=opset)
        onnx.checker.check_model(str(out.temp))
        digest = file_sha256(out.temp)
    info = sidecar(
        model, kind=kind, checkpoint_sha256=checkpoint_sha256, opset=opset, file_sha256_hex=digest
    )
    atomic_write_json(sidecar_path(path), info)
    log.info("exported %s in %.1f s", path, time.perf_counter() - start)
    return info


def export_models(
    model: MobileSAM, out_dir: str | os.PathLike[str], *, checkpoint_sha256: str, opset: int = OPSET
) -> dict[str, Path]:
    """Both models into `out_dir`: mobile_sam_{image_encoder,mask_decoder}_{S}.onnx + .json."""
    out = Path(out_dir)
    paths = {}
    for kind in (ENCODER, DECODER):
        path = out / f"mobile_sam_{kind}_{model.img_size}.onnx"
        write_model(model, path, kind=kind, checkpoint_sha256=checkpoint_sha256, opset=opset)
        paths[kind] = path
    return paths


# ---------------------------------------------------------------------------------------------
# The cache: each model exported once per checkpoint and input size, reused after.


def key_hash(key: dict[str, Any]) -> str:
    """16 hex digits naming a cache entry by its key (exports, calibrations, compiles)."""
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
    cache: str | os.PathLike[str],
) -> Path:
    """The `kind` model of `model` as a cached ONNX file, exported on first use.

    Lives in `cache` (a run's: the weights cache dir unless set) under onnx/, named by a
    hash of its key; reused only when the sidecar's key matches and the file's SHA-256 is
    the one recorded, otherwise exported again (a warning for a corrupt file).
    """
    key = export_key(kind=kind, image_size=model.img_size, checkpoint_sha256=checkpoint_sha256)
    path = Path(cache) / "onnx" / f"{kind}-{model.img_size}-{key_hash(key)}.onnx"
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
        write_model(model, path, kind=kind, checkpoint_sha256=checkpoint_sha256)
    return path
