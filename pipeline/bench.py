"""`samstream bench`: this pipeline's figures beside a peer's, on the same clip, in one run.

Ratios are the headline: absolute times on shared machines are noisy, a ratio measured in
the same run is not. Prints decode frames/s, encoder ms/frame at batch 1 and batched, mask
decoder ms for 1 and 8 objects, and end-to-end frames/s of `samstream run` next to a plain
loop of the official SamPredictor (when `mobile_sam` is installed) and Ultralytics' SAM
(when `ultralytics` is installed).

Then a live run: the source played at its own frame rate in live mode for ``live_seconds``,
with capture-to-publish latency (median, p95), the share of frames within the per-frame
budget and the frames dropped by newest-frame-wins. Its peer figure is the official loop's
time per frame: the latency a synchronous loop would give every frame it does not skip.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.launcher import run_pipeline
from pipeline.predictor import SAM
from pipeline.prompts import parse_prompts
from pipeline.sources import VideoSource, parse_source

DEFAULT_SOURCE = "lavfi:testsrc2=size=1280x720:rate=25"


def _timed_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn` after one warm-up call (device synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _read_frames(source: str, count: int) -> tuple[list[np.ndarray], float]:
    with VideoSource(parse_source(source), max_frames=count) as video:
        start = time.perf_counter()
        frames = [f.image for f in video]
        elapsed = time.perf_counter() - start
    return frames, len(frames) / elapsed


def _official_loop_fps(weights: Path, frames: list[np.ndarray], box: list[float],
                       device: str) -> float | None:
    try:
        import mobile_sam
    except ImportError:
        return None
    model = mobile_sam.sam_model_registry["vit_t"]()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    predictor = mobile_sam.SamPredictor(model.to(device).eval())
    prompt = np.array(box, dtype=np.float32)
    start = time.perf_counter()
    for frame in frames:
        predictor.set_image(frame)
        masks, _, _ = predictor.predict(box=prompt, multimask_output=False)
        ys, xs = np.nonzero(masks[0])
        if xs.size:  # carry the box to the next frame, as a plain tracker would
            prompt = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    return len(frames) / (time.perf_counter() - start)


def _ultralytics_fps(frames: list[np.ndarray], box: list[float], weights: Path) -> float | None:
    try:
        from ultralytics import SAM as UltralyticsSAM
    except ImportError:
        return None
    model = UltralyticsSAM(str(weights))
    start = time.perf_counter()
    for frame in frames:
        model.predict(frame[..., ::-1], bboxes=box, verbose=False)
    return len(frames) / (time.perf_counter() - start)


def _free_publish_endpoint() -> str:
    with socket.socket() as probe:  # a free loopback port: the bench must not clash with a run
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def _live_run(overrides: list[str], source: str, seconds: float) -> dict[str, float | None]:
    """Latency and drops of `seconds` of the source played live."""
    with VideoSource(parse_source(source)) as video:
        rate = float(video.average_rate or 25)
    config = load_config(None, [*overrides, "live.mode=live",
                                f"decoder.max_frames={max(1, round(seconds * rate))}",
                                f"transport.publish={json.dumps(_free_publish_endpoint())}"])
    summary = run_pipeline(config)
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


def run_bench(*, weights: str, source: str, frames: int, device: str, dtype: str,
              image_size: int, repeats: int = 3,
              live_seconds: float = 10.0) -> dict[str, float | None]:
    sam = SAM(weights, device=device, dtype=dtype, image_size=image_size)
    clip, decode_fps = _read_frames(source, frames)
    if not clip:
        raise ValueError(f"{source} gave no frames")
    h, w = clip[0].shape[:2]
    box = [w * 0.3, h * 0.3, w * 0.6, h * 0.7]
    batch = min(4, len(clip))
    results: dict[str, float | None] = {"decode_fps": decode_fps}
    results["encoder_ms_batch1"] = _timed_ms(lambda: sam.encode_batch(clip[:1]), sam.device,
                                             repeats)
    results[f"encoder_ms_per_frame_batch{batch}"] = _timed_ms(
        lambda: sam.encode_batch(clip[:batch]), sam.device, repeats) / batch
    embedded = sam.set_image(clip[0])
    for n in (1, 8):
        prompts = parse_prompts((h, w), bboxes=[box] * n)
        results[f"mask_decoder_ms_{n}_objects"] = _timed_ms(
            lambda p=prompts: sam.decode(embedded, p), sam.device, repeats)

    overrides = [
        f"decoder.source={json.dumps(source)}",
        f"weights={json.dumps(str(sam.weights_path))}", f"encoder.device={device}",
        f"tracker.device={device}", f"encoder.dtype={dtype}", f"encoder.image_size={image_size}",
        f"tracker.prompts={json.dumps([{'box': box}])}",
    ]
    config = load_config(None, [*overrides, f"decoder.max_frames={frames}", "live.mode=offline",
                                f"transport.publish={json.dumps(_free_publish_endpoint())}"])
    summary = run_pipeline(config)
    # From the first published frame on, like the official loop's figure (its model is
    # loaded before its clock starts); the whole run, loading included, is printed beside.
    results["samstream_run_fps_with_startup"] = summary.fps
    results["samstream_run_fps"] = summary.steady_fps
    results["official_predictor_loop_fps"] = _official_loop_fps(
        sam.weights_path, clip, box, device)
    results["ultralytics_fps"] = _ultralytics_fps(clip, box, sam.weights_path)
    if live_seconds > 0:
        results.update(_live_run(overrides, source, live_seconds))
        official = results["official_predictor_loop_fps"]
        results["official_loop_ms_per_frame"] = 1000 / official if official else None
    return results


def format_results(results: dict[str, float | None]) -> str:
    lines = [f"{name:<34} {'-' if v is None else f'{v:10.2f}'}" for name, v in results.items()]
    ours = results["samstream_run_fps"]
    for peer in ("official_predictor_loop_fps", "ultralytics_fps"):
        theirs = results.get(peer)
        if ours and theirs:
            lines.append(f"{'ratio samstream / ' + peer.removesuffix('_fps'):<34} "
                         f"{ours / theirs:10.2f}x")
    latency, loop_ms = results.get("live_latency_ms_median"), results.get(
        "official_loop_ms_per_frame")
    if latency and loop_ms:
        lines.append(f"{'ratio live latency / official loop':<34} {latency / loop_ms:10.2f}x")
    return "\n".join(lines)
