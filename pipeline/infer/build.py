"""How a backend is built from its settings, the same for the image encoder
(``encoder.backend``) and the tracker's mask decoder (``tracker.backend``).

`BackendBuilder.build` is the one flow: check the backend's name; on a GPU, torch (the ONNX
backends run on the CPU only); ``torch``: the model itself; a named ONNX backend: its
package (the install hint first), the model exported to ONNX on first use
(``pipeline.infer.export.cached_onnx``) and loaded; ``auto``: the cached choice of this
machine's calibration, or a new calibration (``pipeline.infer.calibration``). What differs
between the encoder and the mask decoder (its settings' names, its torch backend and ONNX
adapter, its calibration's candidates, inputs, call and reference) is in a subclass
(``pipeline.infer.encoder.EncoderBuilder``, ``pipeline.infer.mask_decoder.MaskDecoderBuilder``).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from pipeline.infer.backend import (
    BACKENDS,
    ONNX_BACKENDS,
    Backend,
    OnnxModel,
    backend_threads,
    check_onnx_precision,
    require,
)
from pipeline.infer.calibration import Calibration, Candidate, calibration_key, choose_backend
from pipeline.infer.export import cached_onnx, file_sha256
from pipeline.model.sam import SamDecoder
from pipeline.model.weights import cache_dir

log = logging.getLogger(__name__)

BackendT = TypeVar("BackendT", bound=Backend)


class BackendBuilder(Generic[BackendT]):
    """Builds one kind of backend for `model` (on its device), `report` saying why.

    threads: intra-op threads (None: the node's budget, `backend_threads`; torch's pool is
    then left as it is). cache: where exports and calibrations live (default: the weights
    cache dir). requested: the settings as asked, for the report.
    """

    section: ClassVar[str]  # the config section: "encoder", "tracker"
    what: ClassVar[str]  # in log lines and errors: "encoder", "tracker mask decoder"
    name: ClassVar[str]  # its calibration files': "encoder", "decoder"
    export_kind: ClassVar[str]  # its ONNX export (pipeline.infer.export.ENCODER, DECODER)
    dtype_setting: ClassVar[str | None] = None  # the config key of its precision, if any
    precisions: ClassVar[tuple[str, ...]]  # what `auto` may choose
    reference_label: ClassVar[str | None] = None  # the candidate the reference also is
    unit: ClassVar[str] = ""  # what a calibration input's name counts, for the log

    def __init__(
        self,
        model: SamDecoder,
        weights_path: str | os.PathLike[str],
        *,
        threads: int | None,
        cache: str | os.PathLike[str] | None,
        requested: dict[str, str],
    ) -> None:
        self.model = model
        self.weights_path = weights_path
        self.threads = threads
        self.cache = Path(cache_dir() if cache is None else cache)
        self.requested = requested

    @property
    def setting(self) -> str:
        return f"{self.section}.backend"

    # What a subclass says -------------------------------------------------------------

    def torch_backend(self, precision: str, threads: int | None) -> BackendT:
        """The model in PyTorch on its device (threads: see `torch_dtype`)."""
        raise NotImplementedError

    def onnx_backend(self, onnx: OnnxModel) -> BackendT:
        """The adapter of the exported model loaded in `onnx`."""
        raise NotImplementedError

    def candidates(self) -> list[Candidate]:
        raise NotImplementedError

    def calibration_inputs(self) -> dict[str, Any]:
        """Input name -> a maker of one calibration call's input."""
        raise NotImplementedError

    def calibration_run(self, backend: Any, x: Any) -> np.ndarray:
        """One calibration call: the output compared with the reference's, and what is timed."""
        raise NotImplementedError

    def calibration_settings(self) -> dict[str, Any]:
        """The kind's own part of the calibration key."""
        raise NotImplementedError

    def reference(self) -> BackendT:
        """What every candidate is compared with: the model in torch fp32."""
        return self.torch_backend("float32", self.threads)

    def calibration_hint(self) -> str:
        """The end of the error when no candidate passes."""
        return ""

    # The flow -------------------------------------------------------------------------

    def make(self, backend: str, precision: str, checkpoint_sha256: str) -> BackendT:
        """One named backend at `precision`, its model exported on first use."""
        if backend == "torch":
            return self.torch_backend(precision, self.threads)
        check_onnx_precision(
            backend, precision, setting=self.setting, dtype_setting=self.dtype_setting
        )
        path = cached_onnx(
            self.model, kind=self.export_kind, checkpoint_sha256=checkpoint_sha256, cache=self.cache
        )
        threads = backend_threads(self.threads, what=self.section)
        return self.onnx_backend(
            OnnxModel(backend, path, precision=precision, threads=threads, setting=self.setting)
        )

    def calibration(self, checkpoint_sha256: str) -> Calibration:
        """What `auto` measures for this kind, with this checkpoint."""
        threads = backend_threads(self.threads, what=self.section)
        size = self.model.img_size
        key = calibration_key(
            self.name,
            image_size=size,
            threads=threads,
            checkpoint_sha256=checkpoint_sha256,
            **self.calibration_settings(),
        )
        return Calibration(
            what=self.what,
            name=self.name,
            key=key,
            image_size=size,
            threads=threads,
            precisions=self.precisions,
            candidates=self.candidates,
            inputs=self.calibration_inputs(),
            run=self.calibration_run,
            make=functools.partial(self.make, checkpoint_sha256=checkpoint_sha256),
            reference=self.reference,
            reference_label=self.reference_label,
            unit=self.unit,
            hint=self.calibration_hint(),
        )

    def build(self, backend: str, precision: str) -> BackendT:
        """The backend named `backend` (auto | torch | onnxruntime | openvino) at
        `precision` (for a named backend; auto measures its own), `report` saying why."""
        if backend not in BACKENDS:
            raise ValueError(f"{self.setting} {backend!r} is not one of {' | '.join(BACKENDS)}")
        device = self.model.device
        if device.type != "cpu":
            if backend in ONNX_BACKENDS:
                raise ValueError(
                    f"{self.setting} {backend} runs on the CPU only; with device {device} "
                    f"use {self.setting} torch or auto"
                )
            chosen_by = "auto on a GPU is torch" if backend == "auto" else "config"
            return self._reported(self.torch_backend(precision, None), chosen_by=chosen_by)
        if backend == "torch":  # no checkpoint hash needed: torch runs the loaded model
            runner = self.torch_backend(precision, self.threads)
        else:
            if backend != "auto":
                require(backend, self.setting)  # the install hint before any export work
            checkpoint_sha256 = file_sha256(self.weights_path)
            if backend == "auto":
                runner, chosen = choose_backend(self.calibration(checkpoint_sha256), self.cache)
                return self._reported(runner, **chosen)
            runner = self.make(backend, precision, checkpoint_sha256)
        log.info(
            "%s backend %s/%s at %d px, %d threads",
            self.what,
            runner.name,
            runner.precision,
            self.model.img_size,
            runner.threads,
        )
        return self._reported(runner, chosen_by="config")

    def _reported(self, runner: BackendT, **chosen: Any) -> BackendT:
        runner.report = {
            **runner.describe(),
            "device": str(self.model.device),
            "requested": self.requested,
            **chosen,
        }
        return runner
