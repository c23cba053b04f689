"""How a backend is built from its settings, the same for the image encoder
(``encoder.backend``) and the tracker's mask decoder (``tracker.backend``).

`build_backend` is the one flow: check the backend's name; on a GPU, torch (the ONNX
backends run on the CPU only); ``torch``: the model itself; a named ONNX backend: its
package (the install hint first), the model exported to ONNX on first use
(``pipeline.infer.export.cached_onnx``) and loaded; ``auto``: the cached choice of this
machine's calibration, or a new calibration (``pipeline.infer.calibration``). What differs
between the encoder and the mask decoder is in a `BackendSpec`
(``pipeline.infer.encoder.build_encoder``, ``pipeline.infer.mask_decoder.build_mask_decoder``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipeline.infer.backend import (
    BACKENDS,
    ONNX_BACKENDS,
    Backend,
    OnnxModel,
    backend_threads,
    check_onnx_precision,
    require,
    set_torch_threads,
)
from pipeline.infer.calibration import Calibration, choose_backend
from pipeline.infer.export import cached_onnx, file_sha256
from pipeline.model.sam import SamDecoder
from pipeline.model.weights import cache_dir

log = logging.getLogger(__name__)

BackendT = TypeVar("BackendT", bound=Backend)


@dataclass(frozen=True)
class BackendSpec(Generic[BackendT]):
    """One kind of backend for one model: what `build_backend` and its calibration need.

    section: the config section ("encoder", "tracker"), in errors; torch: (precision=...)
    -> the model in PyTorch (a `TorchBackend`); onnx: the `OnnxBackend` adapter of a loaded
    export; calibration: what `auto` measures (its `what` names the kind in log lines, its
    `name` is also the ONNX export's kind, ``pipeline.infer.export.ENCODER`` or
    ``DECODER``); dtype_setting: the config key of its precision, if any (for hints). Then
    this build's: model (on its device), weights_path, threads (None: the node's budget,
    `backend_threads`; torch's pool is then left as it is), cache (None: the weights cache
    dir); requested: the settings as asked, for the report.
    """

    section: str
    torch: Callable[..., BackendT]
    onnx: Callable[..., BackendT]
    calibration: Calibration
    model: SamDecoder
    weights_path: str | os.PathLike[str]
    threads: int | None
    cache: str | os.PathLike[str] | None
    requested: dict[str, str]
    dtype_setting: str | None = None

    @property
    def setting(self) -> str:
        return f"{self.section}.backend"

    @functools.cached_property
    def checkpoint_sha256(self) -> str:
        """The checkpoint's SHA-256, read once (torch alone never needs it: it runs the
        loaded model)."""
        return file_sha256(self.weights_path)

    @property
    def cache_path(self) -> Path:
        return Path(cache_dir() if self.cache is None else self.cache)


def make_backend(spec: BackendSpec[BackendT], backend: str, precision: str) -> BackendT:
    """One named backend at `precision`, its model exported on first use."""
    if backend == "torch":
        return spec.torch(precision=precision)
    check_onnx_precision(backend, precision, setting=spec.setting, dtype_setting=spec.dtype_setting)
    path = cached_onnx(
        spec.model,
        kind=spec.calibration.name,
        checkpoint_sha256=spec.checkpoint_sha256,
        cache=spec.cache_path,
    )
    threads = backend_threads(spec.threads, what=spec.section)
    onnx = OnnxModel(backend, path, precision=precision, threads=threads, setting=spec.setting)
    return spec.onnx(onnx, image_size=spec.model.img_size)


def build_backend(spec: BackendSpec[BackendT], backend: str, precision: str) -> BackendT:
    """The backend named `backend` (auto | torch | onnxruntime | openvino) at `precision`
    (for a named backend; auto measures its own), its `report` saying why."""
    if backend not in BACKENDS:
        raise ValueError(f"{spec.setting} {backend!r} is not one of {' | '.join(BACKENDS)}")
    device = spec.model.device
    if device.type != "cpu":
        if backend in ONNX_BACKENDS:
            raise ValueError(
                f"{spec.setting} {backend} runs on the CPU only; with device {device} "
                f"use {spec.setting} torch or auto"
            )
        chosen_by = "auto on a GPU is torch" if backend == "auto" else "config"
        return _reported(spec, spec.torch(precision=precision), chosen_by=chosen_by)
    if backend in ("torch", "auto"):  # torch's pool: for the torch candidate and reference
        set_torch_threads(device, spec.threads)
    if backend == "auto":
        runner, chosen = choose_backend(
            spec.calibration,
            functools.partial(make_backend, spec),
            threads=backend_threads(spec.threads, what=spec.section),
            checkpoint_sha256=spec.checkpoint_sha256,
            cache=spec.cache_path,
        )
        return _reported(spec, runner, **chosen)
    if backend != "torch":
        require(backend, spec.setting)  # the install hint before any export work
    return _reported(spec, make_backend(spec, backend, precision), chosen_by="config")


def _reported(spec: BackendSpec[BackendT], runner: BackendT, **chosen: Any) -> BackendT:
    """`runner`, its report saying how it was chosen; one log line for every build."""
    runner.chosen = {"device": str(spec.model.device), "requested": spec.requested, **chosen}
    log.info(
        "%s backend %s/%s at %d px, %d threads (%s)",
        spec.calibration.what,
        runner.name,
        runner.precision,
        runner.image_size,
        runner.threads,
        chosen["chosen_by"],
    )
    return runner
