"""`samstream bench`: every figure measured, beside the official code's, in one run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_prints_every_figure_and_the_ratios(checkpoint: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "bench",
            "--weights",
            str(checkpoint),
            "--source",
            "lavfi:testsrc2=size=320x240:rate=10",
            "--frames",
            "3",
            "--run-frames",
            "6",
            "--image-size",
            "256",
            "--live-seconds",
            "2",
            "--encoder-sizes",
            "256",  # the backend table at the run's size (1024 and 512 cost 20 s more here)
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.rpartition(" ")
        figures[name.strip()] = value
    for name in (
        "decode_fps",
        "encoder_ms_batch1",
        "mask_decoder_ms_1_objects",
        "samstream_run_fps",
        "official_predictor_loop_fps",
        "live_latency_ms_median",
        "live_latency_ms_p95",
        "live_share_within_budget",
        "official_encoder_ms_1024",
        "encoder_ms_torch_float32_256",
        "encoder_ms_onnxruntime_float32_256",
        "encoder_ms_openvino_float32_256",
    ):
        assert re.fullmatch(r"\d+\.\d+", figures.get(name, "")), f"{name}: {figures.get(name)}"
    assert re.search(r"ratio official fp32 1024 / torch_float32_256 +\d+\.\d+", proc.stdout)
    assert float(figures["live_frames_in"]) == 20  # 2 s of a 10 fps source, played live
    published, dropped = (
        float(figures["live_frames_published"]),
        float(figures["live_frames_dropped"]),
    )
    assert published >= 1 and published + dropped == 20  # every frame accounted for
    assert re.search(r"ratio samstream / official_predictor_loop +\d+\.\d+x", proc.stdout)
    assert re.search(r"ratio live latency / official loop +\d+\.\d+x", proc.stdout)
