"""Image encoder backends: torch, ONNX Runtime and OpenVINO behind one interface, and `auto`.

Every backend takes the same input, made on the host by `preprocess` (the longest side
already resized with PIL, as SamPredictor does): a Bx3xSxS float32 batch, normalised with
SAM's pixel mean/std and zero-padded bottom-right, and returns Bx256x(S/16)x(S/16) float32
embeddings (`EncoderBackend.encode`). The ONNX backends run the encoder that
`pipeline.infer.export` exports on first use and caches.

`auto` (the default of `encoder.backend`) picks, per machine, the fastest backend that is
installed and whose embedding of a fixed textured image is within the tolerance of its
precision of torch fp32 (`TOLERANCES`), by timing each candidate a few times at the run's
input size with the node's thread count. The result is cached as JSON (keyed by CPU model
and flags, input size, threads, backend versions, checkpoint SHA-256) and logged; the
measured milliseconds of every candidate are in `EncoderBackend.report`. Reduced precision
(bf16 autocast, OpenVINO's bf16 inference precision) is a candidate only on CPUs that do bf16
in hardware: emulated bf16 measured 12x slower than fp32. On a GPU, `auto` is torch, which
takes frames as decoded, preprocesses them on the device and replays the encoder from
CUDA graphs (`TorchEncoder`, pipeline.infer.gpu).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import hashlib
import importlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.infer.gpu import CudaGraphRunner, device_preprocess, half_copy, upload
from pipeline.infer.machine import available_cores, cpu_facts, native_bf16
from pipeline.model.sam import PIXEL_MEAN, PIXEL_STD, MobileSAM
from pipeline.model.transforms import resize_longest_side

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# Largest relative error (Frobenius norm of the difference / norm of torch fp32's) of the
# embedding a backend may have, by precision. Measured on random-weight checkpoints: fp32
# 1.1e-6 (ONNX Runtime) and 1.4e-6 (OpenVINO); bf16 0.8e-2 to 2.0e-2 (torch autocast and
# OpenVINO alike), in line with the 2.1e-2 of bf16 on a GPU. A backend over its tolerance
# is never chosen by `auto`.
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
# Calibration: a first run (the parity check and warm-up; a candidate whose first run took
# over FIRST_RUN_PRUNE_FACTOR x the best first run is not timed further), then up to
# CALIBRATION_ROUNDS interleaved timed rounds, dropping after each round a candidate slower
# than PRUNE_FACTOR x the best (it cannot win); no new round starts after
# CALIBRATION_BUDGET_S. Measured on 2 cores: 4 s at 512 and 13 s at 1024, plus the first
# export (2 s / 4 s).
CALIBRATION_ROUNDS = 3
FIRST_RUN_PRUNE_FACTOR = 3.0
PRUNE_FACTOR = 2.0
CALIBRATION_BUDGET_S = 20.0
CALIBRATION_FORMAT = "samstream-encoder-calibration/1"
OPENVINO_EXTRA = "pip install 'samstream[openvino]'"
_INSTALL = {"onnxruntime": "pip install onnxruntime", "openvino": OPENVINO_EXTRA}
_OV_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(precision: str, device: torch.device, threads: int | None) -> torch.dtype:
    """The dtype of a torch backend's ``precision``; on a CPU, torch's intra-op pool set to
    ``threads`` for the whole process (None: left as it is, sized from $OMP_NUM_THREADS in
    a node process)."""
    if precision not in _TORCH_DTYPES:
        raise ValueError(
            f"torch precision must be one of {sorted(_TORCH_DTYPES)}, got {precision!r}"
        )
    if threads is not None and device.type == "cpu" and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return _TORCH_DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` (nothing for float32). No cast cache: inside a CUDA graph
    capture a cached cast would outlive its graph."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


# ---------------------------------------------------------------------------------------------
# Shared preprocessing and machine facts.


def preprocess(resized: np.ndarray, image_size: int) -> np.ndarray:
    """Bxhxwx3 uint8 RGB (longest side resized to at most `image_size`) -> Bx3xSxS float32.

    SAM's normalisation ((x - mean) / std, in float32: the same arithmetic, so the same
    bits, as MobileSAM.preprocess), zero-padded bottom-right to S = image_size.
    """
    if resized.ndim != 4 or resized.shape[3] != 3 or resized.dtype != np.uint8:
        raise ValueError(f"preprocess needs Bxhxwx3 uint8 RGB, got {resized.dtype} {resized.shape}")
    b, h, w, _ = resized.shape
    if h > image_size or w > image_size:
        raise ValueError(
            f"images of {h}x{w} exceed the input size {image_size}; resize the longest side first"
        )
    mean = np.asarray(PIXEL_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(PIXEL_STD, np.float32).reshape(1, 3, 1, 1)
    out = np.zeros((b, 3, image_size, image_size), np.float32)
    out[:, :, :h, :w] = (resized.transpose(0, 3, 1, 2).astype(np.float32) - mean) / std
    return out


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """||actual - reference|| / ||reference|| (Frobenius norms, in float64)."""
    diff = np.linalg.norm((actual.astype(np.float64) - reference.astype(np.float64)).ravel())
    return float(diff / max(np.linalg.norm(reference.astype(np.float64).ravel()), 1e-30))


def calibration_input(image_size: int) -> np.ndarray:
    """The calibration and parity input: 1x3xSxS, a fixed 4:3 textured image, preprocessed.

    Real-valued and image-like (gradients, edges, fine texture, padding), deterministic so
    that every backend sees the same numbers; no file is needed.
    """
    h, w = (3 * image_size) // 4, image_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    image = np.stack(
        [
            255 * xx / w,
            127 + 120 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
            np.where((xx // 32 + yy // 32) % 2 == 0, 200.0, 40.0),
        ],
        axis=-1,
    )
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return preprocess(image[None], image_size)


def encoder_threads(requested: int | None, *, what: str = "encoder") -> int:
    """Intra-op threads of a backend (the encoder's, or the tracker's mask decoder's):
    `requested`; else $OMP_NUM_THREADS, which the launcher sets to the node's budget
    (pipeline.run.launcher.node_environment); else every core this process may use."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"{what} threads must be at least 1, got {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return available_cores()


def import_package(name: str) -> ModuleType:
    """Import a backend's package (ImportError when it is not installed).

    OpenVINO's import sends a usage event to Google Analytics from a process that a thread
    forks (``openvino_telemetry``, on unless opted out): a run must not phone home, and that
    fork, made while the import holds its locks, can deadlock and outlive the node that made
    it (seen: orphaned copies of killed nodes). Without ``openvino_telemetry`` importable,
    OpenVINO uses its own no-op stub."""
    if name == "openvino":
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    return importlib.import_module(name)


def _import(backend: str, setting: str = "encoder.backend") -> ModuleType:
    """The backend's package, or a RuntimeError that says how to install it (`setting`:
    the config key that asked for it)."""
    try:
        return import_package(backend)
    except ImportError as err:
        raise RuntimeError(
            f"{setting} {backend} needs the {backend} package, which is not installed: "
            f"{_INSTALL[backend]} (or use {setting} auto or torch)"
        ) from err


def _installed(backend: str) -> bool:
    try:
        _import(backend)
    except RuntimeError:
        return False
    return True


def backend_versions() -> dict[str, str | None]:
    """Versions of torch and of each ONNX backend (None: not installed)."""
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        try:
            versions[name] = str(import_package(name).__version__)
        except ImportError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------------------------------------
# The backends.


class Backend:
    """What every backend (encoder, mask decoder) says of itself: `name`, `precision`
    ("float32", "bfloat16", "float16"), `threads` (intra-op threads), `image_size`, the
    package `version`; `report` says how it was chosen (filled in by whoever built it)."""

    name: ClassVar[str] = "backend"

    def __init__(self, *, image_size: int, precision: str, threads: int, version: str) -> None:
        self.image_size = image_size
        self.precision = precision
        self.threads = threads
        self.version = version
        self.report: dict[str, Any] = self.describe()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "precision": self.precision,
            "threads": self.threads,
            "image_size": self.image_size,
            "version": self.version,
        }


class EncoderBackend(Backend):
    """One way to run the image encoder: Bx3xSxS float32 (see `preprocess`) -> BxCxhxw float32
    (S: `image_size`)."""

    def _check(self, batch: np.ndarray) -> np.ndarray:
        s = self.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s) or batch.dtype != np.float32:
            raise ValueError(
                f"the encoder takes Bx3x{s}x{s} float32 (pipeline.infer.backends."
                f"preprocess), got {batch.dtype} {batch.shape}"
            )
        return np.ascontiguousarray(batch)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Bx3xSxS float32, normalised and padded -> Bx256x(S/16)x(S/16) float32."""
        raise NotImplementedError

    def encode_images(self, resized: np.ndarray) -> torch.Tensor:
        """Bxhxwx3 uint8 RGB, longest side resized -> BxCx(S/16)x(S/16) float32 tensor."""
        return torch.from_numpy(self.encode(preprocess(resized, self.image_size)))

    def encode_frames(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Same-sized HxWx3 uint8 RGB frames -> (BxCx(S/16)x(S/16) float32 embeddings, the
        (h, w) of the resized image inside the input). Here the resize is PIL's, on the host."""
        resized = np.stack([resize_longest_side(frame, self.image_size) for frame in frames])
        return self.encode_images(resized), (resized.shape[1], resized.shape[2])


class TorchEncoder(EncoderBackend):
    """The PyTorch model, fp32 or in half precision, on its device.

    On a CPU, half precision is autocast over the fp32 weights and frames are resized on the
    host (PIL measured faster there than torch's resize: 22 vs 31 ms for 1080p -> 1024 on
    one core). On CUDA, half precision runs a copy of the image encoder with half weights
    (still under autocast, which keeps norms and softmax in fp32), the whole preprocessing
    runs on the device (`pipeline.infer.gpu.device_preprocess`), and with `cuda_graphs` the
    encoder is replayed from one CUDA graph per batch size and image size
    (`pipeline.infer.gpu.CudaGraphRunner`; eager where a capture fails, with the reason logged).

    threads: None leaves torch's intra-op pool as it is (sized from $OMP_NUM_THREADS in a
    node process); a number sets it, for the whole process.
    """

    name = "torch"

    def __init__(
        self,
        *,
        model: MobileSAM,
        precision: str = "float32",
        threads: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.dtype = torch_dtype(precision, model.device, threads)
        on_cuda = model.device.type == "cuda"
        half_weights = on_cuda and self.dtype != torch.float32
        self.image_encoder = (
            half_copy(model.image_encoder, self.dtype) if half_weights else model.image_encoder
        )
        # What the encoder is fed: its weights' dtype (on a CPU, fp32 under autocast).
        self.input_dtype = self.dtype if half_weights else torch.float32
        # Where frames are resized: on CUDA on the device; on a CPU with PIL (faster there).
        self.resize_on_device = on_cuda
        # Bx3xSxS `input_dtype` on the device -> embeddings in `precision` (not yet float).
        self.run: Callable[[torch.Tensor], torch.Tensor] = self._forward
        if on_cuda and cuda_graphs:
            self.run = CudaGraphRunner(self._forward)
        super().__init__(
            image_size=model.img_size,
            precision=precision,
            threads=torch.get_num_threads(),
            version=torch.__version__,
        )

    def describe(self) -> dict[str, Any]:
        graphs = isinstance(self.run, CudaGraphRunner)
        return {**super().describe(), "cuda_graphs": graphs}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.model.device, self.dtype):
            return self.image_encoder(x)

    @torch.inference_mode()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(self._check(batch)).to(self.model.device, self.input_dtype)
        return self.run(x).float().cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, resized: np.ndarray) -> torch.Tensor:
        # uint8 travels to the device (4x fewer bytes than float) and is normalised there.
        frames = upload(resized, self.model.device)
        x, _ = device_preprocess(
            frames, image_size=self.image_size, dtype=self.input_dtype, resize=False
        )
        return self.run(x).float()

    @torch.inference_mode()
    def encode_frames(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        if not self.resize_on_device:
            return super().encode_frames(frames)
        x, input_size = device_preprocess(
            upload(frames, self.model.device), image_size=self.image_size, dtype=self.input_dtype
        )
        return self.run(x).float(), input_size


class OnnxRuntimeEncoder(EncoderBackend):
    """The exported encoder in ONNX Runtime's CPU provider, fp32, `threads` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, *, path: str | os.PathLike[str], image_size: int, threads: int) -> None:
        ort = _import("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # One operator at a time: the graph is a chain, and a second pool would only
        # compete for the same cores.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings are about unused initialisers
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise RuntimeError(
                f"ONNX Runtime cannot load {path}: {err}; delete the file to export it again"
            ) from err
        self.input_name = self.session.get_inputs()[0].name
        super().__init__(
            image_size=image_size, precision="float32", threads=threads, version=ort.__version__
        )

    def encode(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: self._check(batch)})[0]


def compile_openvino(ov: ModuleType, path: str | os.PathLike[str], config: dict[str, Any]) -> Any:
    """An ONNX model compiled by OpenVINO's CPU plugin with ``config``, through OpenVINO's
    model cache (under samstream's cache dir): a compile OpenVINO has done before, for this
    model, config and version, is loaded instead (0.57 -> 0.18 s for the 256 px encoder
    here), which is most of what a restarted node waits for.

    Each config has a cache directory of its own: OpenVINO's cache key leaves out the
    precision hint (2026.4 names the bf16 and the f32 compile of a model the same blob), and
    on a CPU with AMX a bf16 compile that loaded the f32 blob crashed the process on its
    first inference."""
    from pipeline.model.weights import cache_dir

    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    try:
        return ov.Core().compile_model(
            str(path), "CPU", {**config, "CACHE_DIR": str(cache_dir() / "openvino" / key)}
        )
    except Exception as err:  # openvino raises RuntimeError or its own types
        raise RuntimeError(
            f"OpenVINO cannot load {path}: {err}; delete the file to export it again"
        ) from err


class OpenVinoEncoder(EncoderBackend):
    """The exported encoder in OpenVINO's CPU plugin at an explicit inference precision.

    The precision is always set: on CPUs with native bf16 OpenVINO would otherwise pick bf16
    for an fp32 model by itself.
    """

    name = "openvino"

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        image_size: int,
        threads: int,
        precision: str = "float32",
    ) -> None:
        ov = _import("openvino")
        if precision not in _OV_PRECISION:
            raise ValueError(
                f"encoder.backend openvino runs {' or '.join(_OV_PRECISION)}, not {precision}"
            )
        config = {
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,  # one frame at a time: all threads on it
        }
        self.compiled = compile_openvino(ov, path, config)
        self.request = self.compiled.create_infer_request()
        super().__init__(
            image_size=image_size, precision=precision, threads=threads, version=ov.__version__
        )

    def encode(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: self._check(batch)})
        # The output buffer belongs to the request and is overwritten by the next frame.
        return np.array(self.request.get_output_tensor(0).data, copy=True)


# ---------------------------------------------------------------------------------------------
# Choosing one: the calibration `auto` runs, the same for the encoder and for the tracker's
# mask decoder (pipeline.infer.decoder_backends). Each gives a `Calibration`: its candidates, its
# inputs, its call, its tolerances and its cache name; the rest is here.


@dataclass
class _Candidate:
    backend: str
    precision: str
    tolerance: float  # the largest relative error vs torch fp32 it may have
    skipped: str | None = None
    runner: Any = None  # the built backend (EncoderBackend, DecoderBackend)
    rel_error: float | None = None  # the largest over the inputs
    first_ms: float | None = None  # the parity runs (one per input), warm-up included
    times_ms: dict[str, list[float]] = field(default_factory=dict)  # per input
    dropped: str | None = None  # why it stopped being timed: it could not win
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"

    @property
    def ok(self) -> bool:
        return (
            self.runner is not None
            and self.rel_error is not None
            and self.rel_error <= self.tolerance
        )

    def ms_at(self, name: str) -> float | None:
        times = self.times_ms.get(name)
        return round(statistics.median(times), 2) if times else None

    @property
    def ms(self) -> float | None:
        """The figure candidates are ranked by: the sum over the inputs of the median ms
        (every timed round times every input)."""
        if not self.times_ms:
            return None
        return round(sum(statistics.median(t) for t in self.times_ms.values()), 2)

    def as_dict(self, names: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"backend": self.backend, "precision": self.precision}
        if self.skipped:
            return {**row, "skipped": self.skipped}
        if self.error:
            row["error"] = self.error
        if len(names) > 1:  # one input: `ms` says it all
            row.update({f"ms_{name}": self.ms_at(name) for name in names})
        row.update(
            ms=self.ms,
            runs=len(self.times_ms.get(names[0], [])),
            first_ms=None if self.first_ms is None else round(self.first_ms, 1),
            rel_error=self.rel_error,
            tolerance=self.tolerance,
            ok=self.ok,
        )
        if self.dropped:
            row["dropped"] = self.dropped
        return row


def candidate(backend: str, precision: str, tolerance: float) -> _Candidate:
    """A calibration candidate; skipped, saying how to install it, where its package is not."""
    cand = _Candidate(backend, precision, tolerance)
    if backend != "torch" and not _installed(backend):
        cand.skipped = f"not installed ({_INSTALL[backend]})"
    return cand


@dataclass(frozen=True)
class Calibration:
    """What one kind of backend gives `calibrate` and `choose_backend`.

    what: its name in log lines and errors ("encoder", "tracker mask decoder"); name: its
    cache files' ("encoder", "decoder"); key: what the result depends on
    (`calibration_key`); image_size and threads (the budget): for the log; precisions:
    what a cached choice may name; candidates: every candidate, skipped ones with why;
    inputs: name -> a maker of one call's input (candidates rank by the sum of their
    medians); run: (backend, input) -> the output compared with the reference's, and what
    is timed; make: (backend, precision) -> a built backend (RuntimeError / ValueError
    where it cannot be); reference: the torch fp32 backend; reference_label: the candidate
    that reference also is (reused, not built again), or None; unit: what an input's name
    counts, for the log; hint: the end of the error when no candidate passes.
    """

    what: str
    name: str
    key: dict[str, Any]
    image_size: int
    threads: int
    precisions: tuple[str, ...]
    candidates: Callable[[], list[_Candidate]]
    inputs: dict[str, Callable[[], Any]]
    run: Callable[[Any, Any], np.ndarray]
    make: Callable[[str, str], Any]
    reference: Callable[[], Any]
    reference_label: str | None = None
    unit: str = ""
    hint: str = ""


def _candidates(dtype: str) -> list[_Candidate]:
    """What the encoder's `auto` considers for an `encoder.dtype`, with why any is left out."""
    native = native_bf16()
    precisions = ["float32", "bfloat16"] if dtype == "auto" else [dtype]
    out = []
    for precision in precisions:
        for backend in ("torch", "onnxruntime", "openvino"):
            if precision == "float16" and backend != "torch":
                continue  # neither ONNX backend has an fp16 path on x86 CPUs
            if precision == "bfloat16" and backend == "onnxruntime":
                continue  # ONNX Runtime's CPU provider has no bf16 kernels for this graph
            cand = candidate(backend, precision, TOLERANCES[precision])
            if not cand.skipped and precision == "bfloat16" and dtype == "auto" and not native:
                cand.skipped = "no native bf16 on this CPU (emulated bf16 is ~12x slower)"
            out.append(cand)
    return out


def _make(
    backend: str,
    precision: str,
    *,
    model: MobileSAM,
    checkpoint_sha256: str,
    threads: int | None,
    cache: Path | None,
) -> EncoderBackend:
    if backend == "torch":
        return TorchEncoder(model=model, precision=precision, threads=threads)
    from pipeline.infer.export import ENCODER, cached_onnx

    path = cached_onnx(model, kind=ENCODER, checkpoint_sha256=checkpoint_sha256, cache=cache)
    budget = encoder_threads(threads)
    if backend == "onnxruntime":
        if precision != "float32":
            raise ValueError(
                f"encoder.backend onnxruntime runs float32 only, not {precision}: "
                "set encoder.dtype to float32 or auto"
            )
        return OnnxRuntimeEncoder(path=path, image_size=model.img_size, threads=budget)
    if precision not in _OV_PRECISION:
        raise ValueError(
            f"encoder.backend openvino runs float32 or bfloat16, not {precision}: "
            "set encoder.dtype to one of them or auto"
        )
    return OpenVinoEncoder(
        path=path, image_size=model.img_size, threads=budget, precision=precision
    )


def _time_ms(run: Callable[[Any, Any], np.ndarray], runner: Any, x: Any) -> float:
    start = time.perf_counter()
    run(runner, x)
    return (time.perf_counter() - start) * 1000


def _prune(
    alive: list[_Candidate], figure: Callable[[_Candidate], float], factor: float, what: str
) -> list[_Candidate]:
    """The candidates within `factor` x the best `figure`; the others (they cannot win) are
    marked with why."""
    best = min(alive, key=figure)
    kept = []
    for cand in alive:
        ratio = figure(cand) / max(figure(best), 1e-9)
        if ratio <= factor:
            kept.append(cand)
        else:
            cand.dropped = f"{what} {ratio:.1f}x {best.label}'s"
    return kept


def calibrate(
    calibration: Calibration, crash_record: Path | None = None
) -> tuple[dict[str, Any], Any]:
    """Time and parity-check every candidate of `calibration` on this machine.

    A backend's native code can crash the process (OpenVINO did, on a CPU with AMX): with a
    `crash_record` (a file, absent when nothing crashed), a candidate whose first run ended
    in a fatal signal is skipped from then on, so a restarted node calibrates without it
    instead of dying again; one that was stopped or killed meanwhile is tried again.

    Each candidate's first run of every input is the parity check against the torch fp32
    reference (and its warm-up); the ones within tolerance and not far slower than the
    best first run are then timed in interleaved rounds, a candidate that cannot win
    dropped after each. Returns ({"choice": {"backend", "precision"}, "candidates": [rows:
    first_ms, ms (the sum over the inputs of the median of the timed runs; ms_<input> each
    where there are several), runs, rel_error vs torch fp32 (the largest over the inputs),
    tolerance, ok, dropped; or skipped, or error], "seconds": wall time, exports
    included}, the chosen backend).
    """
    cal = calibration
    start = time.perf_counter()
    inputs = {name: make() for name, make in cal.inputs.items()}
    reference = cal.reference()
    if cal.reference_label is not None:
        # Torch's very first run pays for allocations and kernel choices (2.3x its steady
        # time for the encoder at 1024), ONNX Runtime and OpenVINO pay for theirs at load:
        # warm the reference up first so that its first run, also its candidate's,
        # compares fairly.
        for x in inputs.values():
            cal.run(reference, x)
    first = time.perf_counter()
    expected = {name: cal.run(reference, x) for name, x in inputs.items()}
    reference_ms = (time.perf_counter() - first) * 1000
    candidates = cal.candidates()
    crashed = _crashed(crash_record)
    for cand in candidates:
        if cand.skipped:
            continue
        if cand.label == cal.reference_label:
            cand.runner, cand.rel_error, cand.first_ms = reference, 0.0, reference_ms
            continue
        if cand.label in crashed:
            cand.skipped = "crashed the process in an earlier calibration on this machine"
            continue
        try:
            with _crash_watch(crash_record, crashed, cand.label):
                cand.runner = cal.make(cand.backend, cand.precision)
                first = time.perf_counter()
                outputs = {name: cal.run(cand.runner, x) for name, x in inputs.items()}
                cand.first_ms = (time.perf_counter() - first) * 1000
            cand.rel_error = max(relative_error(outputs[n], expected[n]) for n in inputs)
        except (RuntimeError, ValueError) as err:
            # A backend that cannot load or run the model is not chosen; the run goes on.
            cand.runner, cand.error = None, str(err)
            log.warning("%s backend %s failed in calibration: %s", cal.what, cand.label, err)
        if cand.runner is not None and not cand.ok:
            log.info(
                "%s backend %s is off by %.2g (tolerance %.0e): not a candidate",
                cal.what,
                cand.label,
                cand.rel_error,
                cand.tolerance,
            )
    names = list(inputs)
    alive = [c for c in candidates if c.ok]
    if not alive:
        rows = "; ".join(f"{c.label}: {c.as_dict(names)}" for c in candidates)
        raise RuntimeError(
            f"no {cal.what} backend is installed and within tolerance of torch fp32 "
            f"({rows}){cal.hint}"
        )
    # First runs carry one-off costs (allocation, kernel selection): only a wide margin
    # rules a candidate out before it is timed.
    alive = _prune(alive, lambda c: c.first_ms, FIRST_RUN_PRUNE_FACTOR, "first run")
    deadline = start + CALIBRATION_BUDGET_S
    for _ in range(CALIBRATION_ROUNDS):
        for name, x in inputs.items():
            for cand in alive:  # interleaved, so that a burst of other load hits every one
                cand.times_ms.setdefault(name, []).append(_time_ms(cal.run, cand.runner, x))
        alive = _prune(alive, lambda c: c.ms, PRUNE_FACTOR, "timed")
        if len(alive) == 1 or time.perf_counter() > deadline:
            break
    winner = min((c for c in candidates if c.ok and c.times_ms), key=lambda c: c.ms)
    result = {
        "choice": {"backend": winner.backend, "precision": winner.precision},
        "candidates": [c.as_dict(names) for c in candidates],
        "seconds": round(time.perf_counter() - start, 2),
    }
    return result, winner.runner


def _crashed(record: Path | None) -> list[str]:
    """The candidates that crashed the process (a fatal signal) in an earlier calibration."""
    if record is None or not record.is_file():
        return []
    try:
        head, _, trace = record.read_text(encoding="utf-8").partition("\n")
        noted = json.loads(head)
        crashed = [str(label) for label in noted["crashed"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a torn record: nothing known to crash
    if noted.get("trying") and "Fatal Python error" in trace:
        # faulthandler wrote this: a fatal signal, not a stop or a kill (which retry it).
        crashed.append(str(noted["trying"]))
        log.warning("%s crashed the process in the last calibration:\n%s", crashed[-1], trace)
    if crashed:
        log.warning("skipping %s: crashed the process in an earlier calibration", crashed)
    return crashed


@contextlib.contextmanager
def _crash_watch(record: Path | None, crashed: list[str], label: str) -> Iterator[None]:
    """While candidate ``label`` runs: the record names it, and a fatal signal (SIGSEGV,
    SIGABRT, ...) appends faulthandler's traceback to it, which is what `_crashed` reads as
    a crash. After it, the record holds the crashes only (no file when there are none)."""
    if record is None:
        yield
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    was_enabled = faulthandler.is_enabled()
    with open(record, "w", encoding="utf-8") as file:
        file.write(json.dumps({"crashed": crashed, "trying": label}) + "\n")
        file.flush()
        faulthandler.enable(file=file, all_threads=True)
        try:
            yield
        finally:
            faulthandler.disable()
            if was_enabled:  # on stderr again (where python -X faulthandler or pytest had it)
                with contextlib.suppress(RuntimeError, ValueError, OSError, AttributeError):
                    faulthandler.enable()
    if crashed:
        record.write_text(json.dumps({"crashed": crashed}) + "\n", encoding="utf-8")
    else:
        record.unlink(missing_ok=True)


def calibration_key(
    calibration_format: str,
    *,
    image_size: int,
    threads: int,
    checkpoint_sha256: str,
    **settings: Any,
) -> dict[str, Any]:
    """What a calibration's result depends on: another machine, size, thread count, backend
    version, checkpoint or setting (`settings`: dtype, tolerances, ...) calibrates again."""
    return {
        "format": calibration_format,
        **machine_key(),
        "image_size": image_size,
        "threads": threads,
        "checkpoint_sha256": checkpoint_sha256,
        **settings,
    }


def encoder_calibration_key(
    *, image_size: int, threads: int, dtype: str, checkpoint_sha256: str
) -> dict[str, Any]:
    """The encoder's `calibration_key`: also its encoder.dtype and tolerances."""
    return calibration_key(
        CALIBRATION_FORMAT,
        image_size=image_size,
        threads=threads,
        checkpoint_sha256=checkpoint_sha256,
        dtype=dtype,
        tolerances=TOLERANCES,
    )


def machine_key() -> dict[str, Any]:
    """The machine and software part of every calibration key (encoder and mask decoder):
    CPU model and flags, architecture, backend and samstream versions."""
    from pipeline.infer.export import samstream_version

    model, flags = cpu_facts()
    return {
        "cpu_model": model,
        "cpu_flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest(),
        "machine": platform.machine(),
        "versions": {**backend_versions(), "samstream": samstream_version()},
    }


def calibration_path(cache: Path, what: str, image_size: int, key: dict[str, Any]) -> Path:
    """Where a calibration with `key` is cached: <cache>/calibration/<what>-<size>-<hash>.json."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / "calibration" / f"{what}-{image_size}-{digest}.json"


def load_calibration(
    path: Path, key: dict[str, Any], *, what: str, precisions: Sequence[str]
) -> dict[str, Any] | None:
    """A cached calibration of `what` ("encoder", "tracker mask decoder") for exactly `key`,
    or None: missing, made for another key (never used), or corrupt (a warning; calibrated
    again)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        choice = data["choice"]
        if data["key"] != key:
            return None  # another machine or setting: never used
        if choice["backend"] not in BACKENDS[1:] or choice["precision"] not in precisions:
            raise ValueError(f"unknown choice {choice}")
        return data
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s calibration cache %s is corrupt (%s): calibrating again", what, path, err)
        return None


def _measured(row: dict[str, Any]) -> str:
    """One candidate row of a calibration, for the log: its ms (per input where there are
    several), or why it has none."""
    label = f"{row['backend']}/{row['precision']}"
    if row.get("ms") is None:
        why = row.get("skipped") or row.get("error") or row.get("dropped")
        return f"{label} {why}" if why else f"{label} off by {row['rel_error']:.2g}"
    per_input = [row[k] for k in row if k.startswith("ms_")]
    return f"{label} {' + '.join(f'{ms:.0f}' for ms in per_input or [row['ms']])} ms"


def choose_backend(calibration: Calibration, cache: Path) -> tuple[Any, dict[str, Any]]:
    """The backend `auto` picks for `calibration`: the cached choice for its key, else a new
    calibration (written to `cache`); and the report's part that says so (chosen_by,
    candidates, calibration_s, calibration_file)."""
    from pipeline.infer.export import atomic_write_json

    cal = calibration
    path = calibration_path(cache, cal.name, cal.image_size, cal.key)
    data = load_calibration(path, cal.key, what=cal.what, precisions=cal.precisions)
    runner = None
    if data is not None:
        choice = data["choice"]
        try:
            runner = cal.make(choice["backend"], choice["precision"])
            chosen_by = "calibration cache"
        except (RuntimeError, ValueError) as err:
            log.warning(
                "cached %s choice %s/%s cannot be used (%s): calibrating again",
                cal.what,
                choice["backend"],
                choice["precision"],
                err,
            )
    if runner is None:
        log.info(
            "calibrating the %s backends at %d px with %d threads (once per machine, size "
            "and version; seconds) ...",
            cal.what,
            cal.image_size,
            cal.threads,
        )
        result, runner = calibrate(cal, crash_record=path.with_suffix(".crashes"))
        data = {"key": cal.key, **result}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
        chosen_by = "calibration"
    inputs = " + ".join(cal.inputs) + f" {cal.unit}: " if len(cal.inputs) > 1 else ""
    log.info(
        "%s backend auto -> %s/%s at %d px, %d threads (%s; %s%s)",
        cal.what,
        runner.name,
        runner.precision,
        cal.image_size,
        runner.threads,
        chosen_by,
        inputs,
        ", ".join(_measured(row) for row in data["candidates"]),
    )
    return runner, {
        "chosen_by": chosen_by,
        "candidates": data["candidates"],
        "calibration_s": data["seconds"],
        "calibration_file": str(path),
    }


def _encode(encoder: EncoderBackend, x: np.ndarray) -> np.ndarray:
    return encoder.encode(x)


def _auto(
    *, model: MobileSAM, checkpoint_sha256: str, dtype: str, threads: int | None, cache: Path
) -> EncoderBackend:
    budget = encoder_threads(threads)
    calibration = Calibration(
        what="encoder",
        name="encoder",
        key=encoder_calibration_key(
            image_size=model.img_size,
            threads=budget,
            dtype=dtype,
            checkpoint_sha256=checkpoint_sha256,
        ),
        image_size=model.img_size,
        threads=budget,
        precisions=tuple(TOLERANCES),
        candidates=functools.partial(_candidates, dtype),
        inputs={"image": functools.partial(calibration_input, model.img_size)},
        run=_encode,
        make=functools.partial(
            _make, model=model, checkpoint_sha256=checkpoint_sha256, threads=threads, cache=cache
        ),
        reference=functools.partial(TorchEncoder, model=model, threads=threads),
        reference_label="torch/float32",
        hint=f" for encoder.dtype {dtype}; use encoder.dtype auto or float32",
    )
    encoder, chosen = choose_backend(calibration, cache)
    encoder.report = {
        **encoder.describe(),
        "device": "cpu",
        "requested": {"backend": "auto", "dtype": dtype},
        **chosen,
    }
    return encoder


def build_encoder(
    *,
    model: MobileSAM,
    weights_path: str | os.PathLike[str],
    backend: str = "torch",
    dtype: str = "float32",
    threads: int | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> EncoderBackend:
    """The encoder backend for `model` (on its device), with `report` saying why.

    backend: auto | torch | onnxruntime | openvino. dtype: auto | float32 | bfloat16 |
    float16 (auto: what `auto` measures best within tolerance; for a named backend, or on a
    GPU, float32). threads: intra-op threads (None: the node's budget, see
    `encoder_threads`). cache: where exports and calibrations live (default: the weights
    cache dir).
    """
    if backend not in BACKENDS:
        raise ValueError(f"encoder backend {backend!r} is not one of {' | '.join(BACKENDS)}")
    if dtype not in PRECISIONS:
        raise ValueError(f"encoder dtype {dtype!r} is not one of {' | '.join(PRECISIONS)}")
    device = model.device
    if device.type != "cpu":
        if backend in ("onnxruntime", "openvino"):
            raise ValueError(
                f"encoder.backend {backend} runs on the CPU only; with device "
                f"{device} use encoder.backend torch or auto"
            )
        encoder: EncoderBackend = TorchEncoder(
            model=model, precision="float32" if dtype == "auto" else dtype
        )
        chosen_by = "auto on a GPU is torch" if backend == "auto" else "config"
        encoder.report = {
            **encoder.describe(),
            "device": str(device),
            "requested": {"backend": backend, "dtype": dtype},
            "chosen_by": chosen_by,
        }
        return encoder
    if cache is None:
        from pipeline.model.weights import cache_dir

        cache = cache_dir()
    cache = Path(cache)
    if backend == "torch":
        # No checkpoint hash needed: torch runs the loaded model itself.
        encoder = TorchEncoder(
            model=model, precision="float32" if dtype == "auto" else dtype, threads=threads
        )
    else:
        from pipeline.infer.export import file_sha256

        checkpoint_sha256 = file_sha256(weights_path)
        if backend == "auto":
            return _auto(
                model=model,
                checkpoint_sha256=checkpoint_sha256,
                dtype=dtype,
                threads=threads,
                cache=cache,
            )
        _import(backend)  # the install hint before any export work
        encoder = _make(
            backend,
            "float32" if dtype == "auto" else dtype,
            model=model,
            checkpoint_sha256=checkpoint_sha256,
            threads=threads,
            cache=cache,
        )
    encoder.report = {
        **encoder.describe(),
        "device": "cpu",
        "requested": {"backend": backend, "dtype": dtype},
        "chosen_by": "config",
    }
    log.info(
        "encoder backend %s/%s at %d px, %d threads",
        encoder.name,
        encoder.precision,
        model.img_size,
        encoder.threads,
    )
    return encoder
