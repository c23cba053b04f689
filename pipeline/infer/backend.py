"""What every inference backend is (the image encoder's and the tracker's mask decoder's),
the packages the backends need, and the ONNX layer both run their exported models on.

A backend (`Backend`) says what it is: `name` (torch, onnxruntime, openvino), `precision`
(float32, bfloat16, float16), `threads` (intra-op threads), `image_size`, the package
`version`, all of it in `describe()`; `report` adds how it was chosen (`chosen`, set by
`pipeline.infer.build`), what the nodes put in their status messages. What runs it is a
`TorchBackend` (the PyTorch model on its device) or an `OnnxBackend`.

`OnnxModel` is the ONNX layer: a model exported by `pipeline.infer.export`, loaded on the
CPU by ONNX Runtime or OpenVINO, run on named float32 feeds. The ONNX encoder and the ONNX
mask decoder are `OnnxBackend` adapters around it (their feeds, their outputs).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from types import ModuleType
from typing import Any

import numpy as np
import torch

from pipeline.infer.export import key_hash
from pipeline.infer.machine import available_cores
from pipeline.model.sam import SamDecoder
from pipeline.model.weights import cache_dir

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
ONNX_BACKENDS = ("onnxruntime", "openvino")
INSTALL = {
    "onnxruntime": "pip install onnxruntime",
    "openvino": "pip install 'samstream[openvino]'",
}
# OpenVINO's inference precision hint per precision.
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
# What each ONNX backend runs: ONNX Runtime's CPU provider has no bf16 kernels for these
# graphs, and neither has an fp16 path on x86 CPUs.
ONNX_PRECISIONS = {"onnxruntime": ("float32",), "openvino": tuple(_OPENVINO_PRECISION)}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def require(backend: str, setting: str) -> ModuleType:
    """The backend's package, or a RuntimeError that says how to install it (`setting`:
    the config key that asked for it, e.g. "encoder.backend")."""
    try:
        return import_package(backend)
    except ImportError as err:
        raise RuntimeError(
            f"{setting} {backend} needs the {backend} package, which is not installed: "
            f"{INSTALL[backend]} (or use {setting} auto or torch)"
        ) from err


def backend_version(backend: str) -> str | None:
    """The version of the backend's package; None where it is not installed (torch always is)."""
    if backend == "torch":
        return torch.__version__
    try:
        return str(import_package(backend).__version__)
    except ImportError:
        return None


def installed(backend: str) -> bool:
    """Whether the backend can run here (torch always can)."""
    return backend_version(backend) is not None


def backend_threads(requested: int | None, *, what: str) -> int:
    """Intra-op threads of a backend (`what`: "encoder", "tracker"): `requested`; else
    $OMP_NUM_THREADS, which the launcher sets to the node's budget
    (pipeline.run.launcher.node_environment); else every core this process may use."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"{what} threads must be at least 1, got {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return available_cores()


def set_torch_threads(device: torch.device, threads: int | None) -> None:
    """On a CPU, torch's intra-op pool set to `threads` for the whole process (None: left
    as it is, sized from $OMP_NUM_THREADS in a node process)."""
    if threads is not None and device.type == "cpu" and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` (nothing for float32). No cast cache: inside a CUDA graph
    capture a cached cast would outlive its graph."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """||actual - reference|| / ||reference|| (Frobenius norms, in float64)."""
    diff = np.linalg.norm((actual.astype(np.float64) - reference.astype(np.float64)).ravel())
    return float(diff / max(np.linalg.norm(reference.astype(np.float64).ravel()), 1e-30))


def check_onnx_precision(
    backend: str, precision: str, *, setting: str, dtype_setting: str | None = None
) -> None:
    """A ValueError where the ONNX `backend` cannot run `precision` (`dtype_setting`: the
    config key that chose it, named in the hint)."""
    if backend not in ONNX_PRECISIONS:
        raise ValueError(f"{setting} {backend!r} is not one of {' | '.join(ONNX_BACKENDS)}")
    allowed = ONNX_PRECISIONS[backend]
    if precision in allowed:
        return
    runs, choice = " or ".join(allowed), "one of them"
    if len(allowed) == 1:
        runs, choice = f"{allowed[0]} only", allowed[0]
    hint = f": set {dtype_setting} to {choice} or auto" if dtype_setting else ""
    raise ValueError(f"{setting} {backend} runs {runs}, not {precision}{hint}")


class Backend:
    """What every backend says of itself (see the module docs); subclasses add their call
    (`EncoderBackend.encode`, `MaskDecoderBackend.decode`) and what runs it (`TorchBackend`,
    `OnnxBackend`)."""

    def __init__(
        self, *, name: str, image_size: int, precision: str, threads: int, version: str
    ) -> None:
        self.name = name
        self.image_size = image_size
        self.precision = precision
        self.threads = threads
        self.version = version
        # How it was chosen: set by pipeline.infer.build, read through `report`.
        self.chosen: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "precision": self.precision,
            "threads": self.threads,
            "image_size": self.image_size,
            "version": self.version,
        }

    @property
    def report(self) -> dict[str, Any]:
        """`describe()` and how the backend was chosen (what the nodes put in their status)."""
        return {**self.describe(), **self.chosen}


class TorchBackend(Backend):
    """A backend that runs the PyTorch `model` on its device: fp32, or bfloat16 / float16
    under autocast (`dtype`), with torch's intra-op threads as they are now."""

    def __init__(self, *, model: SamDecoder, precision: str) -> None:
        if precision not in TORCH_DTYPES:
            raise ValueError(
                f"torch precision must be one of {sorted(TORCH_DTYPES)}, got {precision!r}"
            )
        self.model = model
        self.dtype = TORCH_DTYPES[precision]
        super().__init__(
            name="torch",
            image_size=model.img_size,
            precision=precision,
            threads=torch.get_num_threads(),
            version=torch.__version__,
        )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.model.device, self.dtype)


class OnnxBackend(Backend):
    """A backend that runs an exported model (`onnx`, an `OnnxModel`) on the CPU."""

    def __init__(self, onnx: OnnxModel, *, image_size: int) -> None:
        self.onnx = onnx
        super().__init__(
            name=onnx.backend,
            image_size=image_size,
            precision=onnx.precision,
            threads=onnx.threads,
            version=onnx.version,
        )


class OnnxModel:
    """An exported model on the CPU: named float32 feeds -> its outputs, in order.

    onnxruntime: an InferenceSession on the CPU provider (`session`), fp32. openvino: a model
    compiled by the CPU plugin (`compiled`) at an explicit inference precision (float32 or
    bfloat16): it is always set, since on CPUs with native bf16 OpenVINO would otherwise
    pick bf16 for an fp32 model by itself. Either with `threads` intra-op threads and one
    operator (one stream) at a time: the graphs are chains, and a second pool would only
    compete for the same cores. setting: the config key that asked for it (for errors).
    """

    def __init__(
        self,
        backend: str,
        path: str | os.PathLike[str],
        *,
        precision: str,
        threads: int,
        setting: str,
    ) -> None:
        check_onnx_precision(backend, precision, setting=setting)
        package = require(backend, setting)
        self.backend = backend
        self.precision = precision
        self.threads = threads
        self.version = str(package.__version__)
        self.session: Any = None  # onnxruntime's
        self.compiled: Any = None  # openvino's, and its infer request
        self.request: Any = None
        if backend == "onnxruntime":
            self.session = _onnxruntime_session(package, path, threads)
            return
        config = {
            "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self.compiled = compile_openvino(package, path, config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.session is not None:
            return list(self.session.run(None, feeds))
        self.request.infer(feeds)
        # The output buffers belong to the request and are overwritten by the next call.
        count = len(self.compiled.outputs)
        return [np.array(self.request.get_output_tensor(i).data, copy=True) for i in range(count)]


def _onnxruntime_session(ort: ModuleType, path: str | os.PathLike[str], threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings are about unused initialisers
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise RuntimeError(
            f"ONNX Runtime cannot load {path}: {err}; delete the file to export it again"
        ) from err


def compile_openvino(ov: ModuleType, path: str | os.PathLike[str], config: dict[str, Any]) -> Any:
    """An ONNX model compiled by OpenVINO's CPU plugin with ``config``, through OpenVINO's
    model cache (under samstream's cache dir): a compile OpenVINO has done before, for this
    model, config and version, is loaded instead (0.57 -> 0.18 s for the 256 px encoder
    here), which is most of what a restarted node waits for.

    Each config has a cache directory of its own: OpenVINO's cache key leaves out the
    precision hint (2026.4 names the bf16 and the f32 compile of a model the same blob), and
    on a CPU with AMX a bf16 compile that loaded the f32 blob crashed the process on its
    first inference."""
    cache = cache_dir() / "openvino" / key_hash(config)
    try:
        return ov.Core().compile_model(str(path), "CPU", {**config, "CACHE_DIR": str(cache)})
    except Exception as err:  # openvino raises RuntimeError or its own types
        raise RuntimeError(
            f"OpenVINO cannot load {path}: {err}; delete the file to export it again"
        ) from err
