"""Image encoder backends: torch, ONNX Runtime and OpenVINO behind one interface, and `auto`.

Every backend takes the same input, made on the host by `preprocess` (the longest side
already resized with PIL, as SamPredictor does): a Bx3xSxS float32 batch, normalised with
SAM's pixel mean/std and zero-padded bottom-right, and returns Bx256x(S/16)x(S/16) float32
embeddings (`EncoderBackend.encode`). The ONNX backends run the encoder that
`pipeline.export` exports on first use and caches.

`auto` (the default of `encoder.backend`) picks, per machine, the fastest backend that is
installed and whose embedding of a fixed textured image is within the tolerance of its
precision of torch fp32 (`TOLERANCES`), by timing each candidate a few times at the run's
input size with the node's thread count. The result is cached as JSON (keyed by CPU model
and flags, input size, threads, backend versions, checkpoint SHA-256) and logged; the
measured milliseconds of every candidate are in `EncoderBackend.report`. Reduced precision
(bf16 autocast, OpenVINO's bf16 inference precision) is a candidate only on CPUs that do bf16
in hardware: emulated bf16 measured 12x slower than fp32. On a GPU, `auto` is torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.model.sam import PIXEL_MEAN, PIXEL_STD, MobileSAM

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
    (pipeline.launcher.node_environment); else every core this process may use."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"{what} threads must be at least 1, got {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; ("", {}) where there is none."""
    model, flags = "", frozenset()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:  # x86 / Arm
                flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (x86 AVX512_BF16 or AMX-BF16, Arm
    BF16). Elsewhere torch and OpenVINO emulate it, 12x slower than fp32 (measured)."""
    return bool(_cpuinfo()[1] & {"avx512_bf16", "amx_bf16", "bf16"})


def _import(backend: str, setting: str = "encoder.backend") -> ModuleType:
    """The backend's package, or a RuntimeError that says how to install it (`setting`:
    the config key that asked for it)."""
    try:
        return importlib.import_module(backend)
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
            versions[name] = str(importlib.import_module(name).__version__)
        except ImportError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------------------------------------
# The backends.


class EncoderBackend:
    """One way to run the image encoder: Bx3xSxS float32 (see `preprocess`) -> BxCxhxw float32.

    `name`, `precision` ("float32", "bfloat16", "float16"), `threads` (intra-op threads),
    `image_size` (S); `report` says how it was chosen (filled in by `build_encoder`).
    """

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

    def _check(self, batch: np.ndarray) -> np.ndarray:
        s = self.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s) or batch.dtype != np.float32:
            raise ValueError(
                f"the encoder takes Bx3x{s}x{s} float32 (pipeline.backends."
                f"preprocess), got {batch.dtype} {batch.shape}"
            )
        return np.ascontiguousarray(batch)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Bx3xSxS float32, normalised and padded -> Bx256x(S/16)x(S/16) float32."""
        raise NotImplementedError

    def encode_images(self, resized: np.ndarray) -> torch.Tensor:
        """Bxhxwx3 uint8 RGB, longest side resized -> BxCx(S/16)x(S/16) float32 tensor."""
        return torch.from_numpy(self.encode(preprocess(resized, self.image_size)))


class TorchEncoder(EncoderBackend):
    """The PyTorch model, fp32 or under autocast, on its device.

    threads: None leaves torch's intra-op pool as it is (sized from $OMP_NUM_THREADS in a
    node process); a number sets it, for the whole process.
    """

    name = "torch"

    def __init__(
        self, *, model: MobileSAM, precision: str = "float32", threads: int | None = None
    ) -> None:
        if precision not in _TORCH_DTYPES:
            raise ValueError(
                f"torch precision must be one of {sorted(_TORCH_DTYPES)}, got {precision!r}"
            )
        self.model = model
        self.dtype = _TORCH_DTYPES[precision]
        on_cpu = model.device.type == "cpu"
        if threads is not None and on_cpu and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        super().__init__(
            image_size=model.img_size,
            precision=precision,
            threads=torch.get_num_threads(),
            version=torch.__version__,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(self._check(batch)).to(self.model.device)
        with self._autocast():
            out = self.model.image_encoder(x)
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, resized: np.ndarray) -> torch.Tensor:
        # uint8 travels to the device (4x fewer bytes than float) and is normalised there.
        batch = torch.from_numpy(resized if resized.flags.writeable else resized.copy())
        if self.model.device.type == "cuda":
            batch = batch.pin_memory()  # lets the copy overlap with queued GPU work
        batch = batch.to(self.model.device, non_blocking=True).permute(0, 3, 1, 2)
        with self._autocast():
            embeddings = self.model.encode(batch)
        return embeddings.float()


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
    here), which is most of what a restarted node waits for."""
    from pipeline.model.weights import cache_dir

    try:
        return ov.Core().compile_model(
            str(path), "CPU", {**config, "CACHE_DIR": str(cache_dir() / "openvino")}
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
# Choosing one.


@dataclass
class _Candidate:
    backend: str
    precision: str
    skipped: str | None = None
    encoder: EncoderBackend | None = None
    rel_error: float | None = None
    first_ms: float | None = None  # the parity run, warm-up included
    times_ms: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"

    @property
    def ok(self) -> bool:
        return (
            self.encoder is not None
            and self.rel_error is not None
            and self.rel_error <= TOLERANCES[self.precision]
        )

    @property
    def ms(self) -> float | None:
        return round(statistics.median(self.times_ms), 1) if self.times_ms else None

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"backend": self.backend, "precision": self.precision}
        if self.skipped:
            row["skipped"] = self.skipped
            return row
        if self.error:
            row["error"] = self.error
        first = None if self.first_ms is None else round(self.first_ms, 1)
        row.update(
            ms=self.ms,
            runs=len(self.times_ms),
            first_ms=first,
            rel_error=self.rel_error,
            tolerance=TOLERANCES[self.precision],
            ok=self.ok,
        )
        return row


def _candidates(dtype: str) -> list[_Candidate]:
    """What `auto` considers for an `encoder.dtype`, with why any is left out."""
    native = native_bf16()
    precisions = ["float32", "bfloat16"] if dtype == "auto" else [dtype]
    out = []
    for precision in precisions:
        for backend in ("torch", "onnxruntime", "openvino"):
            if precision == "float16" and backend != "torch":
                continue  # neither ONNX backend has an fp16 path on x86 CPUs
            if precision == "bfloat16" and backend == "onnxruntime":
                continue  # ONNX Runtime's CPU provider has no bf16 kernels for this graph
            cand = _Candidate(backend, precision)
            if backend != "torch" and not _installed(backend):
                cand.skipped = f"not installed ({_INSTALL[backend]})"
            elif precision == "bfloat16" and dtype == "auto" and not native:
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
    from pipeline.export import ENCODER, cached_onnx

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


def _time_ms(encoder: EncoderBackend, x: np.ndarray) -> float:
    start = time.perf_counter()
    encoder.encode(x)
    return (time.perf_counter() - start) * 1000


def calibrate(
    *,
    model: MobileSAM,
    checkpoint_sha256: str,
    dtype: str = "auto",
    threads: int | None = None,
    cache: Path | None = None,
) -> tuple[dict[str, Any], EncoderBackend]:
    """Time and parity-check every candidate backend for `dtype` on this machine.

    Each candidate's first run is the parity check (and its warm-up); the ones within
    tolerance and not far slower than the best first run are then timed in interleaved
    rounds. Returns ({"choice": {"backend", "precision"}, "candidates": [rows: first_ms,
    ms (median of the timed runs), runs, rel_error vs torch fp32, tolerance, ok; or
    skipped, or error], "seconds": wall time, exports included}, the chosen backend).
    """
    start = time.perf_counter()
    x = calibration_input(model.img_size)
    reference_encoder = TorchEncoder(model=model, threads=threads)
    # Torch's very first run pays for allocations and kernel choices (2.3x its steady time
    # at 1024), ONNX Runtime and OpenVINO pay for theirs at load: warm torch up first so
    # that first runs compare fairly.
    reference_encoder.encode(x)
    first = time.perf_counter()
    reference = reference_encoder.encode(x)
    reference_ms = (time.perf_counter() - first) * 1000
    candidates = _candidates(dtype)
    for cand in candidates:
        if cand.skipped:
            continue
        try:
            if cand.label == "torch/float32":
                cand.encoder, cand.rel_error, cand.first_ms = reference_encoder, 0.0, reference_ms
                continue
            cand.encoder = _make(
                cand.backend,
                cand.precision,
                model=model,
                checkpoint_sha256=checkpoint_sha256,
                threads=threads,
                cache=cache,
            )
            first = time.perf_counter()
            out = cand.encoder.encode(x)
            cand.first_ms = (time.perf_counter() - first) * 1000
            cand.rel_error = relative_error(out, reference)
        except (RuntimeError, ValueError) as err:
            # A backend that cannot load or run the model is not chosen; the run goes on.
            cand.encoder, cand.error = None, str(err)
            log.warning("encoder backend %s failed in calibration: %s", cand.label, err)
        if cand.encoder is not None and not cand.ok:
            log.info(
                "encoder backend %s is off by %.2g (tolerance %.0e): not a candidate",
                cand.label,
                cand.rel_error,
                TOLERANCES[cand.precision],
            )
    alive = [c for c in candidates if c.ok]
    if not alive:
        rows = "; ".join(f"{c.label}: {c.as_dict()}" for c in candidates)
        raise RuntimeError(
            f"no encoder backend for encoder.dtype {dtype} is installed and "
            f"within tolerance of torch fp32 ({rows}); use encoder.dtype auto "
            "or float32"
        )
    # First runs carry one-off costs (allocation, kernel selection): only a wide margin
    # rules a candidate out before it is timed.
    best_first = min(c.first_ms for c in alive)
    alive = [c for c in alive if c.first_ms <= FIRST_RUN_PRUNE_FACTOR * best_first]
    deadline = start + CALIBRATION_BUDGET_S
    for _ in range(CALIBRATION_ROUNDS):
        for cand in alive:  # interleaved, so that a burst of other load hits every candidate
            cand.times_ms.append(_time_ms(cand.encoder, x))
        best = min(c.ms for c in alive)
        alive = [c for c in alive if c.ms <= PRUNE_FACTOR * best]
        if len(alive) == 1 or time.perf_counter() > deadline:
            break
    winner = min((c for c in candidates if c.ok and c.times_ms), key=lambda c: c.ms)
    result = {
        "choice": {"backend": winner.backend, "precision": winner.precision},
        "candidates": [c.as_dict() for c in candidates],
        "seconds": round(time.perf_counter() - start, 2),
    }
    return result, winner.encoder


def calibration_key(
    *, image_size: int, threads: int, dtype: str, checkpoint_sha256: str
) -> dict[str, Any]:
    """What a calibration's result depends on: another machine, size, thread count, backend
    version or checkpoint calibrates again."""
    return {
        "format": CALIBRATION_FORMAT,
        **machine_key(),
        "image_size": image_size,
        "threads": threads,
        "dtype": dtype,
        "checkpoint_sha256": checkpoint_sha256,
        "tolerances": TOLERANCES,
    }


def machine_key() -> dict[str, Any]:
    """The machine and software part of every calibration key (encoder and mask decoder):
    CPU model and flags, architecture, backend and samstream versions."""
    from pipeline.export import samstream_version

    model, flags = _cpuinfo()
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
    path: Path, key: dict[str, Any], *, what: str, precisions: Any
) -> dict[str, Any] | None:
    """A cached calibration of `what` ("encoder", "mask decoder") for exactly `key`, or None:
    missing, made for another key (never used), or corrupt (a warning; calibrated again)."""
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


def _load_calibration(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    return load_calibration(path, key, what="encoder", precisions=TOLERANCES)


def _auto(
    *, model: MobileSAM, checkpoint_sha256: str, dtype: str, threads: int | None, cache: Path
) -> EncoderBackend:
    from pipeline.export import atomic_write_json

    budget = encoder_threads(threads)
    key = calibration_key(
        image_size=model.img_size, threads=budget, dtype=dtype, checkpoint_sha256=checkpoint_sha256
    )
    path = calibration_path(cache, "encoder", model.img_size, key)
    data = _load_calibration(path, key)
    encoder = None
    if data is not None:
        choice = data["choice"]
        try:
            encoder = _make(
                choice["backend"],
                choice["precision"],
                model=model,
                checkpoint_sha256=checkpoint_sha256,
                threads=threads,
                cache=cache,
            )
            chosen_by = "calibration cache"
        except (RuntimeError, ValueError) as err:
            log.warning(
                "cached encoder choice %s/%s cannot be used (%s): calibrating again",
                choice["backend"],
                choice["precision"],
                err,
            )
    if encoder is None:
        log.info(
            "calibrating the encoder backends at %d px with %d threads (once per "
            "machine, size and version; seconds) ...",
            model.img_size,
            budget,
        )
        result, encoder = calibrate(
            model=model,
            checkpoint_sha256=checkpoint_sha256,
            dtype=dtype,
            threads=threads,
            cache=cache,
        )
        data = {"key": key, **result}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
        chosen_by = "calibration"
    encoder.report = {
        **encoder.describe(),
        "device": "cpu",
        "requested": {"backend": "auto", "dtype": dtype},
        "chosen_by": chosen_by,
        "candidates": data["candidates"],
        "calibration_s": data["seconds"],
        "calibration_file": str(path),
    }
    measured = ", ".join(
        f"{row['backend']}/{row['precision']} "
        + (
            f"{row['ms']:.0f} ms"
            if row.get("ms") is not None
            else row.get("skipped") or row.get("error") or f"off by {row['rel_error']:.2g}"
        )
        for row in data["candidates"]
    )
    log.info(
        "encoder backend auto -> %s/%s at %d px, %d threads (%s; %s)",
        encoder.name,
        encoder.precision,
        model.img_size,
        encoder.threads,
        chosen_by,
        measured,
    )
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
        from pipeline.export import file_sha256

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
