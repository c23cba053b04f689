"""`samstream bench`: this pipeline's figures beside a peer's, on the same clip, in one run.

Ratios are the headline: absolute times on shared machines are noisy, a ratio measured in
the same run is not. Prints decode frames/s, encoder ms/frame at batch 1 and batched, mask
decoder ms for 1 and 8 objects, the tracker's ms per frame at 1, 8, 32, 50 objects with the
mask decoder backend `auto` chose and with each installed one (torch, onnxruntime,
openvino: ``tracker_<backend>_8_vs_1_object`` is the per-object cost), and end-to-end
frames/s of `samstream run` next to a plain loop of the official SamPredictor (when
`mobile_sam` is installed) and Ultralytics' SAM (when `ultralytics` is installed).

Then a live run: the source played at its own frame rate in live mode for ``live_seconds``,
with capture-to-publish latency (median, p95), the share of frames within the per-frame
budget and the frames dropped by newest-frame-wins. Its peer figure is the official loop's
time per frame: the latency a synchronous loop would give every frame it does not skip.

`gpu_encoder_table` (and `compiled_encoder_rows`), run by .ci/gpu-check: the encoder's
device time per precision, batch size and CUDA graphs or not, beside the official encoder,
and the mask decoder's per track count (`format_gpu_table` prints them).
"""

from __future__ import annotations

import functools
import math
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import config_from_dict
from pipeline.infer.backend import BACKENDS, ONNX_BACKENDS, autocast, installed, relative_error
from pipeline.infer.encoder import TorchEncoder, build_encoder, candidates, preprocess
from pipeline.infer.gpu import CudaGraphRunner, device_preprocess, half_copy, upload
from pipeline.infer.machine import available_cores, cpu_facts, native_bf16
from pipeline.infer.timing import median_ms, time_ms
from pipeline.model.sam import SamDecoder
from pipeline.predictor import SAM
from pipeline.prompts import parse_prompts
from pipeline.run.launcher import run_pipeline
from pipeline.run.summary import RunSummary
from pipeline.video.sources import VideoSource, parse_source

DEFAULT_SOURCE = "lavfi:testsrc2=size=1280x720:rate=25"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
PER_OBJECT_COUNTS = (1, 8, 32, 50)


def machine_line() -> dict[str, str]:
    """The CPU this runs on: model name, the cores this process may use, and the vector
    extensions that decide which precision and backend are fast (native bf16 or not)."""
    model, flags = cpu_facts()
    found = ", ".join(f for f in CPU_FLAGS if f in flags) or "none of " + ", ".join(CPU_FLAGS)
    return {"machine": f"{model}, {available_cores()} cores; {found}"}


def _grid_boxes(count: int, size: tuple[int, int]) -> list[list[float]]:
    """``count`` boxes of typical object size (a tenth of the frame's width) on a grid over
    the frame, overlapping their neighbours a little, as a crowded scene would."""
    height, width = size
    half = max(16.0, width / 10) / 2
    columns = max(1, math.ceil(math.sqrt(count * width / height)))
    step_x, step_y = width / columns, height / math.ceil(count / columns)
    centres = np.array(
        [((i % columns + 0.5) * step_x, (i // columns + 0.5) * step_y) for i in range(count)]
    )
    boxes = np.concatenate([centres - half, centres + half], axis=1)
    return np.clip(boxes, 0, [width, height, width, height]).tolist()


def tracker_rows(
    weights: str,
    frame: np.ndarray,
    *,
    image_size: int,
    device: str,
    backends: tuple[str, ...] = ("auto",),
    counts: tuple[int, ...] = PER_OBJECT_COUNTS,
    repeats: int = 3,
) -> dict[str, float | str]:
    """Tracker (and publisher) milliseconds per frame with 1, 8, 32, 50 objects: the nodes'
    own code on one encoded frame, all file outputs on (PNG, RLE, MOT, overlay); and each
    stage's 8 vs 1 object ratio, its per-object cost.

    backends: the tracker's mask decoder backends (``tracker.backend``) to time. auto's rows
    are ``tracker_ms_<N>_objects``, ``publisher_ms_<N>_objects`` and their
    ``<stage>_8_vs_1_object``, with the ``tracker_backend`` it chose; a named backend's are
    the tracker's only, ``tracker_ms_<backend>_<N>_objects`` and
    ``tracker_<backend>_8_vs_1_object`` (``tracker_ms_<backend>`` says when it is not
    installed)."""
    import tempfile

    import msgspec

    from nodes.encoder import EncoderNode
    from nodes.publisher import PublisherNode
    from nodes.tracker import TrackerNode
    from pipeline.config import EncoderConfig, PromptConfig, PublisherConfig, TrackerConfig
    from pipeline.wire.messages import FrameMessage, FrameMeta

    encoder = EncoderNode(
        EncoderConfig(device=device, image_size=image_size, batch_size=1),
        weights=weights,
        carry_images=True,
    )
    encoder.setup()
    meta = FrameMeta(
        stream_id="bench", seq=0, frame_index=0, pts=0, time_base=(1, 25), capture_time=time.time()
    )
    (embedded,) = encoder.process_batch([FrameMessage(meta=meta, image=frame)])
    # The same embedding as frames 0, 1, ... (frame 0 starts the tracks: it is not timed).
    frames = [
        msgspec.structs.replace(
            embedded, meta=msgspec.structs.replace(meta, seq=index, frame_index=index, pts=index)
        )
        for index in range(repeats + 1)
    ]
    results: dict[str, float | str] = {}
    for backend in backends:
        if backend in ONNX_BACKENDS and not installed(backend):
            results[f"tracker_ms_{backend}"] = "skipped: not installed"
            continue
        tag = "" if backend == "auto" else f"{backend}_"
        stages = ("tracker", "publisher") if backend == "auto" else ("tracker",)
        for count in counts:
            prompts = tuple(
                PromptConfig(box=tuple(box))  # type: ignore[arg-type]
                for box in _grid_boxes(count, frame.shape[:2])
            )
            tracker = TrackerNode(
                TrackerConfig(device=device, prompts=prompts, backend=backend),
                weights=weights,
                image_size=image_size,
            )
            tracker.setup()
            with tempfile.TemporaryDirectory(prefix="samstream-bench-") as out:
                publisher = PublisherNode(PublisherConfig(out=out), budget_ms=math.inf)
                publisher.setup()
                times = _stage_times(frames, [tracker.process, publisher.process])
                publisher.abort()
            for stage, stage_times in zip(stages, times, strict=False):
                results[f"{stage}_ms_{tag}{count}_objects"] = statistics.median(stage_times)
        if backend == "auto":
            results["tracker_backend"] = tracker.detail["backend"]["backend"]
        for stage in stages:
            one, eight = (results.get(f"{stage}_ms_{tag}{n}_objects") for n in (1, 8))
            if isinstance(one, float) and isinstance(eight, float) and one:
                results[f"{stage}_{tag}8_vs_1_object"] = eight / one
    return results


def _stage_times(frames: list[Any], steps: list[Callable[[Any], list[Any]]]) -> list[list[float]]:
    """Milliseconds of each step on each frame but the first (it starts the tracks), each
    step taking what the one before it gave (frame -> masks -> nothing)."""
    times: list[list[float]] = [[] for _ in steps]
    for index, msg in enumerate(frames):
        msgs = [msg]
        for step, step_times in zip(steps, times, strict=True):
            start = time.perf_counter()
            msgs = step(msgs[0])
            if index:
                step_times.append((time.perf_counter() - start) * 1000)
    return times


def encoder_table(
    weights: str, frame: np.ndarray, *, sizes: tuple[int, ...], repeats: int
) -> dict[str, float | str | None]:
    """Encoder ms per frame for every backend x precision x image size on this CPU (the
    candidates of ``encoder.backend: auto``), and the choice `auto` makes (its calibration,
    cached, as a run would see it). A candidate `auto` would skip (not installed; bf16
    where the CPU would emulate it, 12x slower than fp32 measured) is skipped here too."""
    from pipeline.model.transforms import resize_longest_side

    results: dict[str, float | str | None] = {}
    for size in sizes:
        sam = SAM(weights, device="cpu", image_size=size, backend="torch", dtype="float32")
        batch = preprocess(resize_longest_side(frame, size)[None], size)
        # By backend, then precision: the table's order.
        for cand in sorted(candidates("auto"), key=lambda c: BACKENDS.index(c.backend)):
            backend, precision = cand.backend, cand.precision
            name = f"encoder_ms_{backend}_{precision}_{size}"
            if cand.skipped:
                results[name] = f"skipped: {cand.skipped}"
                continue
            try:
                encoder = build_encoder(
                    model=sam.model, weights_path=sam.weights_path, backend=backend, dtype=precision
                )
            except (ImportError, ValueError, RuntimeError) as err:
                results[name] = f"skipped: {str(err).splitlines()[0][:60]}"
                continue
            results[name] = median_ms(lambda e=encoder, b=batch: e.encode(b), repeats=repeats)
        auto = build_encoder(
            model=sam.model, weights_path=sam.weights_path, backend="auto", dtype="auto"
        )
        results[f"encoder_auto_choice_{size}"] = f"{auto.name}/{auto.precision}"
    return results


# ---------------------------------------------------------------------------------------------
# The GPU table (.ci/gpu-check): encoder and mask decoder device times, beside the official
# encoder, measured in one run. Runs on the CPU too (the tests do, tiny): rows that need
# CUDA then say so.

GPU_BATCHES = (1, 4, 16)
GPU_TRACKS = (1, 8, 32)
# (row name, precision, CUDA graphs): the torch encoder's variants in the table.
GPU_ENCODER_VARIANTS = (
    ("fp32_eager", "float32", False),
    ("fp16_eager", "float16", False),
    ("fp16_graph", "float16", True),
    ("bf16_eager", "bfloat16", False),
)
NO_CUDA = "n/a: no CUDA"
EMULATED = "n/a: emulated on this CPU"


def _official_encoders(
    weights: Path, device: torch.device, image_size: int
) -> dict[str, Callable[[torch.Tensor], torch.Tensor] | str]:
    """The official image encoder as fp32 eager and as fp16 in a CUDA graph (half weights
    under autocast, as ours), each a callable or the reason it cannot run here."""
    names = ("official_fp32_eager", "official_fp16_graph")
    if image_size != 1024:
        return dict.fromkeys(names, "n/a: the official encoder runs at 1024 only")
    predictor = _official_predictor(weights, device)
    if predictor is None:
        return dict.fromkeys(names, "n/a: no mobile_sam (pip install mobilesam-mirror)")
    fp32 = predictor.model.image_encoder
    if device.type != "cuda":
        return {names[0]: fp32, names[1]: NO_CUDA}
    fp16 = half_copy(fp32, torch.float16)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, torch.float16):
            return fp16(x)

    return {names[0]: fp32, names[1]: CudaGraphRunner(forward)}


def gpu_encoder_table(
    weights: str,
    frame: np.ndarray,
    *,
    device: str,
    image_size: int = 1024,
    batches: tuple[int, ...] = GPU_BATCHES,
    tracks: tuple[int, ...] = GPU_TRACKS,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, float | str | None]:
    """Encoder ms at each batch size for fp32 / fp16 / bf16 eager and fp16 in CUDA graphs,
    the official encoder's fp32 eager and fp16 graph beside; each variant's relative error
    vs fp32 eager and whether its output is finite (batch 1, `frame`); ms of `encode_frames`
    from the host frame (upload and preprocessing included) at batch 1; mask decoder ms for
    each track count in fp32 and fp16. Encoder times are of the encoder alone, on inputs
    already preprocessed on the device, as the official figures are.

    Rows: ``encoder_ms_<variant>_batch<B>``, ``encoder_rel_error_<variant>``,
    ``encoder_finite_<variant>``, ``encode_frames_ms_<variant>_batch1``,
    ``mask_decoder_ms_<fp32|fp16>_<N>_tracks``.
    """
    sam = SAM(weights, device=device, image_size=image_size, backend="torch", dtype="float32")
    dev = sam.device
    cuda = dev.type == "cuda"
    results: dict[str, float | str | None] = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "encoder_image_size": str(image_size),
    }
    inputs = {}  # per batch size and dtype: the preprocessed input, made on the device
    for b in batches:
        frames = upload([frame] * b, dev)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            inputs[(b, dtype)], _ = device_preprocess(frames, image_size=image_size, dtype=dtype)
    # name -> (the encoder on a preprocessed input, or why it cannot run; its input dtype)
    variants: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor] | str, torch.dtype]] = {}
    encoders: dict[str, TorchEncoder] = {}
    for name, precision, graphs in GPU_ENCODER_VARIANTS:
        if graphs and not cuda:
            variants[name] = (NO_CUDA, torch.float32)
            continue
        if not cuda and precision != "float32" and not (precision == "bfloat16" and native_bf16()):
            variants[name] = (EMULATED, torch.float32)  # 5-12x slower than fp32: no figure
            continue
        encoder = TorchEncoder(model=sam.model, precision=precision, cuda_graphs=graphs)
        encoders[name] = encoder
        variants[name] = (encoder.run, encoder.input_dtype)
    for name, fn in _official_encoders(sam.weights_path, dev, image_size).items():
        variants[name] = (fn, torch.float16 if "fp16" in name else torch.float32)

    def timed(fn: Callable[[], object]) -> float:
        return median_ms(fn, device=dev, repeats=repeats, warmup=warmup)

    with torch.inference_mode():
        reference = None
        for name, (fn, dtype) in variants.items():
            if isinstance(fn, str):
                results.update({f"encoder_ms_{name}_batch{b}": fn for b in batches})
                continue
            for b in batches:
                results[f"encoder_ms_{name}_batch{b}"] = timed(
                    lambda f=fn, x=inputs[(b, dtype)]: f(x)
                )
            out = fn(inputs[(batches[0], dtype)])[:1].float()
            reference = out if reference is None else reference  # fp32 eager comes first
            results[f"encoder_rel_error_{name}"] = relative_error(
                out.cpu().numpy(), reference.cpu().numpy()
            )
            results[f"encoder_finite_{name}"] = str(bool(torch.isfinite(out).all()))
        for name, encoder in encoders.items():
            results[f"encode_frames_ms_{name}_batch1"] = timed(
                lambda e=encoder: e.encode_frames([frame])
            )
        embedding, input_size = encoders["fp32_eager"].encode_frames([frame])
        for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            for n in tracks:
                boxes = torch.tensor(_grid_boxes(n, input_size), dtype=torch.float32, device=dev)
                results[f"mask_decoder_ms_{label}_{n}_tracks"] = (
                    timed(functools.partial(_decode, sam.model, embedding, boxes, dtype))
                    if cuda or dtype == torch.float32
                    else EMULATED
                )
    return results


def _decode(
    model: SamDecoder, embedding: torch.Tensor, boxes: torch.Tensor, dtype: torch.dtype
) -> object:
    with autocast(model.device, dtype):
        return model.decode(embedding, boxes=boxes)


def compiled_encoder_rows(
    weights: str, frame: np.ndarray, *, device: str, image_size: int = 1024, repeats: int = 20
) -> dict[str, float | str | None]:
    """The fp16 encoder through ``torch.compile(mode="reduce-overhead")`` (Inductor kernels
    replayed from CUDA graphs) at batch 1: the seconds its first call takes (the compile,
    cached by torch under its cache dir for later processes), then ms as in
    `gpu_encoder_table`, and its relative error vs fp32 eager. The alternative to
    `pipeline.infer.gpu.CudaGraphRunner`, measured beside it, not used by the pipeline."""
    sam = SAM(weights, device=device, image_size=image_size, backend="torch", dtype="float32")
    if sam.device.type != "cuda":
        return {"encoder_ms_fp16_compiled_batch1": NO_CUDA}
    exact = TorchEncoder(model=sam.model, precision="float32", cuda_graphs=False)
    half = TorchEncoder(model=sam.model, precision="float16", cuda_graphs=False)
    compiled = torch.compile(half.run, mode="reduce-overhead", dynamic=False)
    frames = upload([frame], sam.device)
    x, _ = device_preprocess(frames, image_size=image_size, dtype=torch.float16)
    x32, _ = device_preprocess(frames, image_size=image_size, dtype=torch.float32)
    with torch.inference_mode():
        out: list[torch.Tensor] = []  # a copy: the next call may overwrite its output buffer
        [compile_ms] = time_ms(lambda: out.append(compiled(x).clone()), device=sam.device)
        return {
            "encoder_compile_s_fp16_batch1": compile_ms / 1000,
            "encoder_ms_fp16_compiled_batch1": median_ms(
                lambda: compiled(x), device=sam.device, repeats=repeats, warmup=3
            ),
            "encoder_rel_error_fp16_compiled": relative_error(
                out[0].float().cpu().numpy(), exact.run(x32).cpu().numpy()
            ),
        }


def format_gpu_table(results: dict[str, float | str | None]) -> str:
    """The encoder rows as a variant x batch matrix of ms (a variant that cannot run: its
    reason once), then every other row by name."""
    matrix: dict[str, dict[str, float | str | None]] = {}
    rest = []
    for name, value in results.items():
        if name.startswith("encoder_ms_") and "_batch" in name:
            variant, _, batch = name.removeprefix("encoder_ms_").rpartition("_batch")
            matrix.setdefault(variant, {})[batch] = value
        elif "rel_error" in name and isinstance(value, float):
            rest.append(f"{name:<48} {value:10.2e}")  # errors span 1e-7 to 1e-1
        else:
            rest.append(f"{name:<48} {_value(value)}")
    columns = sorted({b for row in matrix.values() for b in row}, key=int)
    lines = [f"{'encoder ms (median) / batch':<28}" + "".join(f"{b:>12}" for b in columns)]
    for variant, row in matrix.items():
        cells = [row.get(b) for b in columns]
        if all(isinstance(c, str) for c in cells) and len(set(cells)) == 1:
            lines.append(f"{variant:<28}  {cells[0]}")
        else:
            lines.append(f"{variant:<28}" + "".join(f"{_value(c):>12}" for c in cells))
    return "\n".join(lines + rest)


def read_frames(source: str, count: int) -> tuple[list[np.ndarray], float]:
    """The first `count` frames of `source`, and how many it decoded per second."""
    frames: list[np.ndarray] = []
    with VideoSource(parse_source(source), max_frames=count) as video:
        [ms] = time_ms(lambda: frames.extend(f.image for f in video))
    return frames, 1000 * len(frames) / ms


def _official_predictor(weights: Path, device: str | torch.device) -> Any:
    """The official MobileSAM's SamPredictor with `weights` on `device` (None: not installed)."""
    try:
        import mobile_sam
    except ImportError:
        return None
    model = mobile_sam.sam_model_registry["vit_t"]()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return mobile_sam.SamPredictor(model.to(device).eval())


def _official_loop_fps(predictor: Any, frames: list[np.ndarray], box: list[float]) -> float:
    """Frames per second of a plain loop of the official SamPredictor: encode, decode the
    box, carry the mask's box to the next frame (as a plain tracker would)."""
    prompt = np.array(box, dtype=np.float32)

    def loop() -> None:
        nonlocal prompt
        for frame in frames:
            predictor.set_image(frame)
            masks, _, _ = predictor.predict(box=prompt, multimask_output=False)
            ys, xs = np.nonzero(masks[0])
            if xs.size:
                prompt = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)

    [ms] = time_ms(loop)
    return 1000 * len(frames) / ms


def _ultralytics_fps(frames: list[np.ndarray], box: list[float], weights: Path) -> float | None:
    try:
        from ultralytics import SAM as UltralyticsSAM
    except ImportError:
        return None
    model = UltralyticsSAM(str(weights))
    [ms] = time_ms(lambda: [model.predict(f[..., ::-1], bboxes=box, verbose=False) for f in frames])
    return 1000 * len(frames) / ms


def _run(run: dict[str, Any], *, max_frames: int, mode: str) -> RunSummary:
    """`samstream run` with the config ``run`` (a config file's data) for ``max_frames`` in
    live.mode ``mode``, publishing on a free loopback port (the bench must not clash with a
    run)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        publish = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    extra = {"live": {"mode": mode}, "transport": {"publish": publish}}
    run = {**run, **extra, "decoder": {**run["decoder"], "max_frames": max_frames}}
    return run_pipeline(config_from_dict(run, source="samstream bench"))


def _live_run(run: dict[str, Any], source: str, seconds: float) -> dict[str, float | None]:
    """Latency and drops of `seconds` of the source played live."""
    with VideoSource(parse_source(source)) as video:
        rate = float(video.average_rate or 25)
    summary = _run(run, max_frames=max(1, round(seconds * rate)), mode="live")
    ms = summary.timings.get("ms", {})
    latency, processing = ms.get("latency") or {}, ms.get("processing") or {}
    return {
        "live_source_fps": rate,
        "live_frames_in": summary.frames_in,
        "live_frames_published": summary.frames_out,
        "live_frames_dropped": sum(summary.dropped.values()),
        "live_latency_ms_median": latency.get("median"),
        "live_latency_ms_p95": latency.get("p95"),
        "live_processing_ms_median": processing.get("median"),
        "live_budget_ms": summary.timings.get("budget_ms"),
        "live_share_within_budget": summary.timings.get("share_within_budget"),
    }


def run_bench(
    *,
    weights: str,
    source: str,
    frames: int,
    device: str,
    dtype: str,
    image_size: int,
    repeats: int = 3,
    live_seconds: float = 10.0,
    encoder_sizes: tuple[int, ...] = (1024, 512),
    run_frames: int = 60,
) -> dict[str, float | str | None]:
    sam = SAM(weights, device=device, dtype=dtype, image_size=image_size, backend="auto")
    clip, decode_fps = read_frames(source, frames)
    if not clip:
        raise ValueError(f"{source} gave no frames")
    h, w = clip[0].shape[:2]
    box = [w * 0.3, h * 0.3, w * 0.6, h * 0.7]
    batch = min(4, len(clip))
    official = _official_predictor(sam.weights_path, device)

    def timed(fn: Callable[[], object]) -> float:
        with torch.inference_mode():
            return median_ms(fn, device=sam.device, repeats=repeats)

    results: dict[str, float | str | None] = {**machine_line(), "decode_fps": decode_fps}
    # The official image encoder, fp32, on one frame (it runs at 1024 only): the reference
    # every encoder figure is a ratio to.
    official_ms = official and timed(lambda: official.set_image(clip[0]))
    results["official_encoder_ms_1024"] = official_ms
    if device == "cpu" and encoder_sizes:
        table = encoder_table(str(sam.weights_path), clip[0], sizes=encoder_sizes, repeats=repeats)
        results.update(table)
        for name, value in list(table.items()):
            if name.startswith("encoder_ms_") and isinstance(value, float) and official_ms:
                results[f"ratio official fp32 1024 / {name.removeprefix('encoder_ms_')}"] = (
                    official_ms / value
                )
    results["encoder_backend"] = "{backend}/{precision}".format(**sam.backend_report)
    results["encoder_ms_batch1"] = timed(lambda: sam.encode_batch(clip[:1]))
    per_frame = timed(lambda: sam.encode_batch(clip[:batch])) / batch
    results[f"encoder_ms_per_frame_batch{batch}"] = per_frame
    embedded = sam.set_image(clip[0])
    for n in (1, 8):
        prompts = parse_prompts((h, w), bboxes=[box] * n)
        results[f"mask_decoder_ms_{n}_objects"] = timed(lambda p=prompts: sam.decode(embedded, p))
    # Each mask decoder backend too, on a CPU (the ONNX backends run there only).
    backends = ("auto", "torch", *ONNX_BACKENDS) if device == "cpu" else ("auto",)
    results.update(
        tracker_rows(
            str(sam.weights_path),
            clip[0],
            image_size=image_size,
            device=device,
            backends=backends,
            repeats=repeats,
        )
    )

    run = {
        "decoder": {"source": source},
        "weights": str(sam.weights_path),
        "encoder": {"device": device, "dtype": dtype, "image_size": image_size},
        "tracker": {"device": device, "prompts": [{"box": box}]},
    }
    # Long enough for the steady rate to be measured after the backlog that queues while the
    # slowest node loads (pipeline.run.live.FrameTimings.steady_fps).
    summary = _run(run, max_frames=run_frames, mode="offline")
    # In its stride, like the official loop's figure (its model is loaded before its clock
    # starts); the whole run, loading included, is printed beside.
    results["samstream_run_fps_with_startup"] = summary.fps
    results["samstream_run_fps"] = summary.steady_fps
    loop_fps = official and _official_loop_fps(official, clip, box)
    results["official_predictor_loop_fps"] = loop_fps
    results["ultralytics_fps"] = _ultralytics_fps(clip, box, sam.weights_path)
    if live_seconds > 0:
        results.update(_live_run(run, source, live_seconds))
        results["official_loop_ms_per_frame"] = 1000 / loop_fps if loop_fps else None
    return results


def _value(value: float | str | None) -> str:
    if isinstance(value, str):
        return value
    return "-" if value is None else f"{value:10.2f}"


def format_results(results: dict[str, float | str | None]) -> str:
    """Every figure by name, then the ratios to the peers measured in the same run."""
    lines = [f"{name:<48} {_value(v)}" for name, v in results.items()]
    ratios = {
        "ratio samstream / official_predictor_loop": (
            "samstream_run_fps",
            "official_predictor_loop_fps",
        ),
        "ratio samstream / ultralytics": ("samstream_run_fps", "ultralytics_fps"),
        "ratio live latency / official loop": (
            "live_latency_ms_median",
            "official_loop_ms_per_frame",
        ),
    }
    for label, (ours, theirs) in ratios.items():
        mine, peer = results.get(ours), results.get(theirs)
        if isinstance(mine, (int, float)) and isinstance(peer, (int, float)) and mine and peer:
            lines.append(f"{label:<48} {mine / peer:10.2f}x")
    return "\n".join(lines)
