"""Encoder backends: parity with torch fp32, the export cache, `auto`'s calibration, threads.

At 256 px on the random-weight checkpoint. Tolerances (relative error of the embedding,
pipeline.infer.encoder.TOLERANCES): fp32 1e-4 (measured ~1e-6 for ONNX Runtime and OpenVINO),
bf16 3e-2 (measured ~1.6e-2).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, config_from_dict
from pipeline.infer import calibration, encoder, export
from pipeline.infer.backend import backend_threads, installed, relative_error
from pipeline.infer.encoder import TOLERANCES, build_encoder, calibration_input
from pipeline.infer.machine import native_bf16
from pipeline.predictor import SAM

SIZE = 256
HAS_OPENVINO = installed("openvino")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own cache: no export or calibration leaks between tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAMSTREAM_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def torch_sam(checkpoint: Path) -> SAM:
    return SAM(checkpoint, image_size=SIZE)


@pytest.fixture(scope="module")
def shared_cache(torch_sam: SAM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the checkpoint's exported encoder: exported once for the module."""
    cache = tmp_path_factory.mktemp("shared-cache")
    export.cached_onnx(
        torch_sam.model,
        kind=export.ENCODER,
        checkpoint_sha256=export.file_sha256(torch_sam.weights_path),
        cache=cache,
    )
    return cache


@pytest.fixture
def seeded(shared_cache: Path, _cache: Path) -> Path:
    """This test's cache with the export already in it (for tests about something else)."""
    shutil.copytree(shared_cache / "onnx", _cache / "onnx")
    return _cache


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the ONNX exports (one entry per export, its kind)."""
    calls: list[str] = []
    real = export.export_onnx

    def counting(model, path, *, kind, opset=export.OPSET):
        calls.append(kind)
        real(model, path, kind=kind, opset=opset)

    monkeypatch.setattr(export, "export_onnx", counting)
    return calls


def _variants() -> list:
    # Emulated bf16 (no native bf16) is 12x slower and never chosen by auto, but still right.
    out = [("torch", "float32"), ("onnxruntime", "float32"), ("torch", "bfloat16")]
    ov = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
    out += [
        pytest.param("openvino", "float32", marks=ov),
        pytest.param("openvino", "bfloat16", marks=ov),
    ]
    return out


@pytest.mark.parametrize(("backend", "precision"), _variants())
def test_every_backend_matches_torch_fp32(
    torch_sam: SAM, shared_cache: Path, real_image, backend: str, precision: str
) -> None:
    encoder = build_encoder(
        model=torch_sam.model,
        weights_path=torch_sam.weights_path,
        backend=backend,
        dtype=precision,
        cache=shared_cache,
    )
    assert (encoder.name, encoder.precision) == (backend, precision)
    x = calibration_input(SIZE)
    reference = torch_sam.encoder.encode(x)
    synthetic = relative_error(encoder.encode(x), reference)
    # And through encode_images, the path SAM.encode_batch takes, on a real photo.
    from pipeline.model.transforms import resize_longest_side

    resized = resize_longest_side(real_image, SIZE)[None]
    photo = relative_error(
        encoder.encode_images(resized).numpy(), torch_sam.encoder.encode_images(resized).numpy()
    )
    print(f"{backend}/{precision}: relative error {synthetic:.2e} (textured), {photo:.2e} (photo)")
    assert synthetic <= TOLERANCES[precision] and photo <= TOLERANCES[precision]


def test_batch_of_two(torch_sam: SAM, shared_cache: Path) -> None:
    encoder = build_encoder(
        model=torch_sam.model,
        weights_path=torch_sam.weights_path,
        backend="onnxruntime",
        cache=shared_cache,
    )
    x = np.concatenate([calibration_input(SIZE), calibration_input(SIZE)[:, :, ::-1]])
    got = encoder.encode(np.ascontiguousarray(x))
    assert got.shape == (2, 256, SIZE // 16, SIZE // 16)
    assert relative_error(got, torch_sam.encoder.encode(np.ascontiguousarray(x))) <= 1e-4
    with pytest.raises(ValueError, match=r"Bx3x256x256 float32"):
        encoder.encode(x[:, :, :128].astype(np.float64))


def test_sam_with_onnxruntime_predicts_like_torch(
    checkpoint: Path, torch_sam: SAM, seeded: Path, real_image: np.ndarray
) -> None:
    sam = SAM(checkpoint, image_size=SIZE, backend="onnxruntime")
    assert sam.backend_report["backend"] == "onnxruntime"
    box = [200, 40, 330, 330]
    [got], [expected] = (
        sam.predict(real_image, bboxes=box),
        torch_sam.predict(real_image, bboxes=box),
    )
    assert relative_error(got.logits, expected.logits) <= 1e-4
    embedded = sam.set_image(real_image)
    assert embedded.embedding.dtype == torch.float32
    assert embedded.embedding.shape == (1, 256, SIZE // 16, SIZE // 16)
    certain = np.abs(expected.logits) >= 1e-3
    np.testing.assert_array_equal((got.logits > 0)[certain], (expected.logits > 0)[certain])


def test_export_is_cached_and_reused(checkpoint: Path, _cache: Path, exports: list[str]) -> None:
    SAM(checkpoint, image_size=SIZE, backend="onnxruntime")
    assert exports == ["image_encoder"]
    [model_file] = (_cache / "onnx").glob("*.onnx")
    mtime = model_file.stat().st_mtime_ns
    SAM(checkpoint, image_size=SIZE, backend="onnxruntime")
    assert exports == ["image_encoder"]  # no second export
    assert model_file.stat().st_mtime_ns == mtime


def test_a_stale_export_is_never_used(
    checkpoint: Path, tmp_path: Path, seeded: Path, exports: list[str], caplog
) -> None:
    # Another checkpoint: other weights, so another key.
    state = torch.load(checkpoint, weights_only=True)
    name = next(k for k in state if k.startswith("image_encoder.neck"))
    state[name] = state[name] + 0.5
    other = tmp_path / "other.pt"
    torch.save(state, other)
    sam = SAM(other, image_size=SIZE, backend="onnxruntime")
    assert exports == ["image_encoder"]
    x = calibration_input(SIZE)
    reference = SAM(other, image_size=SIZE).encoder.encode(x)
    assert relative_error(sam.encoder.encode(x), reference) <= 1e-4
    # A sidecar whose key says another checkpoint (edited, or a name clash) is rebuilt too.
    side = next(
        p
        for p in (seeded / "onnx").glob("*.json")
        if json.loads(p.read_text())["checkpoint_sha256"] == export.file_sha256(other)
    )
    info = json.loads(side.read_text())
    side.write_text(json.dumps({**info, "checkpoint_sha256": "0" * 64}))
    with caplog.at_level(logging.INFO, logger="pipeline.infer.export"):
        SAM(other, image_size=SIZE, backend="onnxruntime")
    assert len(exports) == 2 and "stale" in caplog.text


@pytest.mark.parametrize("damage", ["model", "sidecar"])
def test_a_corrupt_export_is_rebuilt_with_a_warning(
    checkpoint: Path, seeded: Path, exports: list[str], caplog, damage: str
) -> None:
    [model_file] = (seeded / "onnx").glob("*.onnx")
    if damage == "model":
        model_file.write_bytes(model_file.read_bytes()[: 1 << 20])  # truncated
    else:
        model_file.with_suffix(".json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pipeline.infer.export"):
        sam = SAM(checkpoint, image_size=SIZE, backend="onnxruntime")
    assert exports == ["image_encoder"]
    assert any(r.levelno == logging.WARNING and "corrupt" in r.getMessage() for r in caplog.records)
    assert sam.encoder.encode(calibration_input(SIZE)).shape == (1, 256, 16, 16)


@pytest.fixture
def fast_calibration(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One timed round (tests check the mechanism, not the timings); counts calibrations."""
    monkeypatch.setattr(calibration, "CALIBRATION_ROUNDS", 1)
    calls: list[int] = []
    real = calibration.calibrate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", counting)
    return calls


def test_auto_calibrates_once_and_reuses_the_result(
    checkpoint: Path, seeded: Path, fast_calibration: list[int]
) -> None:
    first = SAM(checkpoint, image_size=SIZE, backend="auto", dtype="auto").backend_report
    assert fast_calibration == [1] and first["chosen_by"] == "calibration"
    key = json.loads(Path(first["calibration_file"]).read_text())["key"]
    assert key["kind"] == export.ENCODER and key["dtype"] == "auto"
    assert key == _encoder_key(threads=key["threads"], checkpoint_sha256=key["checkpoint_sha256"])
    rows = {(r["backend"], r["precision"]): r for r in first["candidates"]}
    assert rows[("torch", "float32")]["ok"] and rows[("torch", "float32")]["rel_error"] == 0
    for row in rows.values():
        if "skipped" not in row:  # a first (parity) run each; timed runs unless far slower
            assert row["first_ms"] > 0 and row["ok"] == (row["rel_error"] <= row["tolerance"])
    winner = rows[(first["backend"], first["precision"])]
    timed = [r["ms"] for r in rows.values() if r.get("ok") and r["ms"] is not None]
    assert winner["ok"] and winner["ms"] == min(timed)
    if not native_bf16():  # never emulated
        assert all("skipped" in r for r in rows.values() if r["precision"] == "bfloat16")
    second = SAM(checkpoint, image_size=SIZE, backend="auto", dtype="auto").backend_report
    assert fast_calibration == [1] and second["chosen_by"] == "calibration cache"
    assert (second["backend"], second["precision"]) == (first["backend"], first["precision"])
    assert second["candidates"] == first["candidates"]


def _encoder_key(**change: object) -> dict:
    """The encoder's calibration key (pipeline.infer.encoder.EncoderBuilder's settings)."""
    args = {"image_size": SIZE, "threads": 2, "checkpoint_sha256": "a" * 64, **change}
    settings = {"dtype": args.pop("dtype", "auto"), "tolerances": TOLERANCES}
    return calibration.calibration_key(export.ENCODER, **args, **settings)  # type: ignore[arg-type]


def test_a_calibration_for_another_key_is_never_used(tmp_path: Path) -> None:
    key = _encoder_key()
    for change in (
        {"threads": 1},
        {"image_size": 512},
        {"checkpoint_sha256": "b" * 64},
        {"dtype": "float32"},
    ):
        assert _encoder_key(**change) != key
    assert {"cpu_model", "cpu_flags_sha256", "versions"} <= key.keys()
    assert {"torch", "onnxruntime", "openvino", "samstream"} <= key["versions"].keys()
    path = tmp_path / "calibration.json"
    choice = {"backend": "onnxruntime", "precision": "float32"}
    path.write_text(json.dumps({"key": {**key, "threads": 1}, "choice": choice}))

    def load() -> dict | None:
        return calibration.load_calibration(path, key, what="encoder", precisions=("float32",))

    assert load() is None
    path.write_text(json.dumps({"key": key, "choice": choice}))
    assert load()["choice"] == choice


def test_a_corrupt_calibration_is_redone_with_a_warning(
    checkpoint: Path, seeded: Path, fast_calibration: list[int], caplog
) -> None:
    SAM(checkpoint, image_size=SIZE, backend="auto", dtype="float32")
    [path] = (seeded / "calibration").glob("*.json")
    path.write_text('{"key": ')
    with caplog.at_level(logging.WARNING, logger="pipeline.infer.calibration"):
        report = SAM(checkpoint, image_size=SIZE, backend="auto", dtype="float32").backend_report
    assert fast_calibration == [1, 1] and report["chosen_by"] == "calibration"
    assert "corrupt" in caplog.text
    assert report["precision"] == "float32"  # dtype float32: fp32 candidates only
    assert all(r["precision"] == "float32" for r in report["candidates"])


def test_auto_without_openvino_uses_what_is_there(
    checkpoint: Path, seeded: Path, monkeypatch: pytest.MonkeyPatch, fast_calibration: list[int]
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` -> ImportError
    monkeypatch.setattr(encoder, "native_bf16", lambda: False)
    report = SAM(checkpoint, image_size=SIZE, backend="auto", dtype="auto").backend_report
    assert report["backend"] in ("torch", "onnxruntime") and report["precision"] == "float32"
    rows = {(r["backend"], r["precision"]): r for r in report["candidates"]}
    assert "samstream[openvino]" in rows[("openvino", "float32")]["skipped"]
    assert "native bf16" in rows[("torch", "bfloat16")]["skipped"]
    assert rows[("onnxruntime", "float32")]["ok"]


def test_openvino_missing_names_the_extra(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeError, match=r"pip install 'samstream\[openvino\]'"):
        SAM(checkpoint, image_size=SIZE, backend="openvino")


def test_bad_backend_arguments(torch_sam: SAM) -> None:
    with pytest.raises(ValueError, match="not one of auto"):
        SAM(torch_sam.weights_path, image_size=SIZE, backend="tensorrt")
    with pytest.raises(ValueError, match="onnxruntime runs float32 only"):
        build_encoder(
            model=torch_sam.model,
            weights_path=torch_sam.weights_path,
            backend="onnxruntime",
            dtype="bfloat16",
        )
    # The ONNX backends are CPU only (a model on another device: the meta one will do).
    from pipeline.model.sam import build_mobile_sam

    with pytest.raises(ValueError, match="runs on the CPU only"):
        build_encoder(
            model=build_mobile_sam(img_size=SIZE).to("meta"),
            weights_path=torch_sam.weights_path,
            backend="openvino",
        )


@pytest.mark.gpu
def test_auto_on_a_gpu_is_torch(checkpoint: Path) -> None:
    report = SAM(checkpoint, device="cuda", image_size=SIZE, backend="auto").backend_report
    assert report["backend"] == "torch" and report["chosen_by"] == "auto on a GPU is torch"


def test_threads_come_from_the_budget(
    torch_sam: SAM, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the launcher sets for a node
    assert backend_threads(None, what="encoder") == 1
    assert backend_threads(3, what="encoder") == 3
    ort_encoder = build_encoder(
        model=torch_sam.model,
        weights_path=torch_sam.weights_path,
        backend="onnxruntime",
        cache=shared_cache,
    )
    assert ort_encoder.threads == 1 and ort_encoder.report["threads"] == 1
    assert ort_encoder.onnx.session.get_session_options().intra_op_num_threads == 1
    if HAS_OPENVINO:
        ov_encoder = build_encoder(
            model=torch_sam.model,
            weights_path=torch_sam.weights_path,
            backend="openvino",
            threads=2,
            cache=shared_cache,
        )
        assert ov_encoder.onnx.compiled.get_property("INFERENCE_NUM_THREADS") == 2
        import openvino as ov

        assert ov_encoder.onnx.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert backend_threads(None, what="encoder") >= 1


def test_config_backend_key() -> None:
    assert config_from_dict({}).encoder.backend == "auto"
    assert (
        config_from_dict({"encoder": {"backend": "openvino", "dtype": "auto"}}).encoder.dtype
        == "auto"
    )
    with pytest.raises(ConfigError, match=r"encoder\.backend: must be auto \| torch"):
        config_from_dict({"encoder": {"backend": "tensorrt"}})
    with pytest.raises(ConfigError, match=r"encoder\.dtype: must be"):
        config_from_dict({"encoder": {"dtype": "int8"}})


def test_encoder_node_reports_its_backend(checkpoint: Path, seeded: Path) -> None:
    from nodes.encoder import EncoderNode
    from pipeline.config import EncoderConfig
    from pipeline.wire.messages import EmbeddingMessage, FrameMessage, FrameMeta

    config = EncoderConfig(device="cpu", backend="onnxruntime", image_size=SIZE, batch_size=1)
    node = EncoderNode(config, weights=str(checkpoint), carry_images=False)
    node.setup()
    assert node.detail["backend"]["backend"] == "onnxruntime"
    assert node.detail["backend"]["chosen_by"] == "config"
    json.dumps(node.detail)  # travels in status messages
    meta = FrameMeta(
        stream_id="cam0", seq=0, frame_index=0, pts=0, time_base=(1, 25), capture_time=0.0
    )
    image = np.zeros((120, 160, 3), np.uint8)
    [out] = node.process_batch([FrameMessage(meta=meta, image=image)])
    assert isinstance(out, EmbeddingMessage) and out.embedding.shape == (256, 16, 16)


def test_openvino_is_imported_without_its_telemetry() -> None:
    """OpenVINO's import would fork a process that sends a usage event to Google Analytics:
    through samstream it forks nothing (a fresh interpreter, so the import really runs)."""
    pytest.importorskip("openvino")
    code = (
        "import os, sys, time\n"
        "forks = []\n"
        "real = os.fork\n"
        "os.fork = lambda: forks.append(1) or real()\n"
        "from pipeline.infer.backend import import_package\n"
        "import_package('openvino')\n"
        "time.sleep(1)  # the telemetry is sent from a thread\n"
        "print(len(forks), sys.modules.get('openvino_telemetry'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "None"], out.stdout + out.stderr


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_each_openvino_precision_has_its_own_compile_cache(seeded: Path) -> None:
    """OpenVINO's model cache names a model's f32 and bf16 compiles the same blob: a bf16
    compile that found the f32 one crashed the process on its first inference (a CPU with
    AMX, OpenVINO 2026.4). f32 then bf16 through samstream's cache, in a fresh interpreter
    (a crash must fail this test, not end the suite), then f32 again from the cache."""
    [onnx] = (seeded / "onnx").glob("image_encoder-*.onnx")
    code = (
        "import sys, numpy as np\n"
        "from pipeline.infer.backend import OnnxModel\n"
        "from pipeline.infer.encoder import OnnxEncoder, calibration_input\n"
        "x = calibration_input(int(sys.argv[2]))\n"
        "out = {}\n"
        "for precision in ('float32', 'bfloat16', 'float32'):\n"
        "    model = OnnxModel('openvino', sys.argv[1], precision=precision, threads=1,"
        " setting='encoder.backend')\n"
        "    enc = OnnxEncoder(model, image_size=int(sys.argv[2]))\n"
        "    out.setdefault(precision, []).append(enc.encode(x))\n"
        "ref = out['float32'][0]\n"
        "err = lambda a: float(np.abs(a - ref).max() / np.abs(ref).max())\n"
        "print(err(out['float32'][1]), err(out['bfloat16'][0]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code, str(onnx), str(SIZE)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-3000:]}"
    f32_again, bf16 = (float(v) for v in run.stdout.split())
    assert f32_again == 0.0  # the cached f32 compile is the f32 compile
    assert bf16 < TOLERANCES["bfloat16"]
    assert len(list((seeded / "openvino").iterdir())) == 2  # one cache per config


_CRASHING_CALIBRATION = """
import logging, os, signal, sys
from pathlib import Path
import numpy as np
from pipeline.infer import calibration
logging.basicConfig(level=logging.INFO)

class Scaled:  # a backend: its output is the input times a factor
    def __init__(self, name, precision, factor):
        self.name, self.precision, self.threads, self.factor = name, precision, 1, factor

def make(backend, precision):
    once = Path(sys.argv[1], "killed-once")
    if backend == "openvino":
        os.kill(os.getpid(), signal.SIGSEGV)  # native code crashing, as OpenVINO's did
    if backend == "onnxruntime" and not once.exists():
        once.touch()
        os.kill(os.getpid(), signal.SIGKILL)  # a launcher's kill: not the backend's fault
    return Scaled(backend, precision, 1.0)

cal = calibration.Calibration(
    what="encoder", name="image_encoder", image_size=16, settings={"test": 1},
    precisions=("float32",),
    candidates=lambda: [
        calibration.candidate(b, "float32", 1e-4) for b in ("torch", "onnxruntime", "openvino")
    ],
    inputs={"image": lambda: np.ones(4, np.float32)},
    run=lambda backend, x: x * backend.factor,
    reference=lambda: Scaled("torch", "float32", 1.0),
    reference_label="torch/float32",
)
runner, report = calibration.choose_backend(
    cal, make, threads=1, checkpoint_sha256="0" * 64, cache=Path(sys.argv[1])
)
print(runner.name, [row.get("skipped") for row in report["candidates"]])
"""


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_a_backend_that_crashes_the_calibration_is_skipped_after_the_restart(
    tmp_path: Path,
) -> None:
    """A candidate whose native code kills the process (SIGSEGV) during its first run: the
    process dies (as a node would), and the next calibration, on the same machine and key,
    skips that candidate and chooses among the rest, so a restarted node does not die again.
    A candidate that was running when the process was killed from outside (SIGKILL) is no
    suspect: it is tried again."""
    run = [sys.executable, "-c", _CRASHING_CALIBRATION, str(tmp_path)]
    killed = subprocess.run(run, capture_output=True, text=True)  # onnxruntime: SIGKILL
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    crashed = subprocess.run(run, capture_output=True, text=True)  # openvino: SIGSEGV
    assert crashed.returncode == -signal.SIGSEGV, crashed.stderr
    assert "skipping" not in crashed.stderr  # the kill marked nothing
    [record] = (tmp_path / "calibration").glob("*.crashes")
    assert "Fatal Python error: Segmentation fault" in record.read_text()
    third = subprocess.run(run, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert "skipping ['openvino/float32']" in third.stderr and "calibrating" in third.stderr
    assert "Segmentation fault" in third.stderr  # the crash's traceback, in the node's log
    name, skipped = third.stdout.split(" ", 1)
    assert name in ("torch", "onnxruntime")
    assert skipped.strip() == str(
        [None, None, "crashed the process in an earlier calibration on this machine"]
    )
    assert json.loads(record.read_text()) == {"crashed": ["openvino/float32"]}
    # The finished calibration is cached: a fourth start neither calibrates nor crashes.
    fourth = subprocess.run(run, capture_output=True, text=True)
    assert fourth.returncode == 0 and "calibrating" not in fourth.stderr, fourth.stderr
