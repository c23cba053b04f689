"""The GPU paths: half precision and the whole graph on CUDA, checked against the CPU.

Skipped without a CUDA device (CI has none); `.ci/gpu-check` runs them on a lent GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from media import make_clip
from test_pipeline_e2e import collect, free_port

from pipeline.client import MaskSubscriber
from pipeline.config import load_config
from pipeline.launcher import run_pipeline
from pipeline.predictor import SAM

pytestmark = pytest.mark.gpu


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cuda_stays_close_to_float32(
    checkpoint: Path, real_image: np.ndarray, dtype: str
) -> None:
    box = [200, 40, 330, 330]
    exact = SAM(checkpoint, device="cpu").predict(real_image, bboxes=box)
    fast = SAM(checkpoint, device="cuda", dtype=dtype).predict(real_image, bboxes=box)
    err = np.linalg.norm(fast.logits - exact.logits) / np.linalg.norm(exact.logits)
    assert err < 0.05, f"{dtype} logits drifted {err:.4f} from float32 on the CPU"
    assert iou(fast.masks[0], exact.masks[0]) > 0.95


def _run(clip: Path, checkpoint: Path, device: str, *extra: str) -> tuple[list, object]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = load_config(
        None,
        [
            f"decoder.source={json.dumps(str(clip))}",
            f"weights={json.dumps(str(checkpoint))}",
            f"encoder.device={device}",
            f"tracker.device={device}",
            "encoder.image_size=1024",
            "tracker.prompts=[{box: [30, 60, 100, 120]}]",
            f"transport.publish={endpoint}",
            *extra,
        ],
    )
    received: list = []
    with MaskSubscriber(endpoint, timeout_ms=120_000) as sub:
        thread = collect(sub, received)
        summary = run_pipeline(config, in_process=True)
        thread.join(timeout=30)
    return received, summary


def test_offline_graph_on_cuda_matches_the_cpu(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=12, size=(320, 240), fps=10)
    on_cpu, _ = _run(clip, checkpoint, "cpu")
    on_gpu, summary = _run(clip, checkpoint, "cuda")
    assert summary.frames_in == summary.frames_out == 12
    assert [f.seq for f in on_gpu] == [f.seq for f in on_cpu] == list(range(12))
    for cpu_frame, gpu_frame in zip(on_cpu, on_gpu, strict=True):
        assert [t.track_id for t in gpu_frame.tracks] == [t.track_id for t in cpu_frame.tracks]
        for a, b in zip(cpu_frame.masks, gpu_frame.masks, strict=True):
            assert iou(a, b) > 0.98


def test_live_graph_on_cuda_accounts_for_every_frame(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=60, size=(640, 480), fps=30)
    frames, summary = _run(clip, checkpoint, "cuda", "live.mode=live")
    assert summary.mode == "live" and summary.timings["budget_ms"] == 12.0
    assert summary.frames_in == 60
    assert summary.frames_in == summary.frames_out + sum(summary.dropped.values())
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)) and len(frames) == summary.frames_out
    stages = {"decode", "encoder", "tracker", "publish", "latency"}
    assert all(stages <= f.timings.keys() for f in frames)
