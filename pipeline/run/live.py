"""What live mode means: settings resolved from the source and the hardware, and per-frame
timing held against the budget.

Live mode is chosen for cameras (RTSP, webcams) and on request for anything else (a file
played at its own frame rate). In it every link keeps only the newest frame, so a slow stage
never makes latency grow; each frame's stage times and capture-to-publish latency travel with
it, and the publisher holds the frame's processing time (the sum of its stage times: decode,
encoder, tracker, publish) against the per-frame budget. Latency is reported beside it: it
adds the waits between stages, which newest-frame-wins keeps to about one frame.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from pipeline.config import RunConfig
from pipeline.video.sources import SourceError, parse_source
from pipeline.wire.stats import WINDOW, percentiles

log = logging.getLogger(__name__)

GPU_BUDGET_MS = 12.0  # MobileSAM's promise on a GPU: 8 ms encoder + 4 ms decoder
CPU_BUDGET_MS = 400.0  # a 512 encode (~230 ms here) + one object's masks on 2 cores
CPU_LIVE_IMAGE_SIZE = 512  # 4x fewer pixels than 1024: about 5x faster on a CPU
GPU_BATCH = 4  # frames encoded together on a GPU when several are waiting (offline)
STAGES = ("decode", "encoder", "tracker", "publish")


def _cuda_available() -> bool:
    import torch  # only when a device is "auto": importing torch takes a second

    return torch.cuda.is_available()


def source_is_live(source: str) -> bool:
    """True for cameras (RTSP, webcams); a bad source is not live (the decoder reports it)."""
    try:
        return parse_source(source).is_live
    except SourceError:
        return False


def is_live(config: RunConfig) -> bool:
    """Live delivery (newest frame wins) for a resolved config."""
    return config.live.mode == "live"


def resolve_run_config(
    config: RunConfig, *, cuda_available: Callable[[], bool] = _cuda_available
) -> RunConfig:
    """``config`` with every "auto" made concrete: live.mode, the devices, the encoder's
    image size and batch size, and the budget. Resolving a resolved config changes nothing."""
    live = config.live
    mode = live.mode
    if mode == "auto":
        mode = "live" if source_is_live(config.decoder.source) else "offline"
    encoder, tracker = config.encoder, config.tracker
    if "auto" in (encoder.device, tracker.device):
        device = "cuda" if cuda_available() else "cpu"
        if encoder.device == "auto":
            encoder = msgspec.structs.replace(encoder, device=device)
        if tracker.device == "auto":
            tracker = msgspec.structs.replace(tracker, device=device)
    on_gpu = encoder.device.startswith("cuda")
    if encoder.image_size is None:
        size = CPU_LIVE_IMAGE_SIZE if mode == "live" and not on_gpu else 1024
        encoder = msgspec.structs.replace(encoder, image_size=size)
    if encoder.batch_size is None:
        # Batching feeds a GPU; on a CPU it measured slower per frame than one at a time.
        encoder = msgspec.structs.replace(encoder, batch_size=GPU_BATCH if on_gpu else 1)
    budget = live.budget_ms
    if budget is None:
        budget = GPU_BUDGET_MS if on_gpu else CPU_BUDGET_MS
    return msgspec.structs.replace(
        config,
        encoder=encoder,
        tracker=tracker,
        live=msgspec.structs.replace(live, mode=mode, budget_ms=budget),
    )


class FrameTimings:
    """Per-frame stage times, latency and the budget, as the publisher sees each frame.

    ``add`` takes a frame's ``timings`` ({stage: ms, "latency": ms}); ``interval`` gives the
    figures since the previous call (for status), ``summary`` those of the whole run (the
    most recent ``WINDOW`` frames for the percentiles).
    """

    def __init__(self, budget_ms: float) -> None:
        self.budget_ms = budget_ms
        self.frames = 0
        self.within_budget = 0
        self._stages: dict[str, deque[float]] = {}
        self._interval_frames = 0
        self._interval_over = 0
        self._interval_latency: list[float] = []
        self.first_time: float | None = None  # wall clock of the first and last frame
        self.last_time: float | None = None
        self._times: deque[float] = deque(maxlen=WINDOW)  # wall clock of the recent frames

    def add(self, timings: Mapping[str, float]) -> float:
        """Record one frame; returns its processing time (sum of its stage times)."""
        now = time.time()
        self.first_time = self.first_time or now
        self.last_time = now
        self._times.append(now)
        processing = sum(timings.get(stage, 0.0) for stage in STAGES)
        for key, value in (*timings.items(), ("processing", processing)):
            self._stages.setdefault(key, deque(maxlen=WINDOW)).append(value)
        self.frames += 1
        self._interval_frames += 1
        if processing <= self.budget_ms:
            self.within_budget += 1
        else:
            self._interval_over += 1
        if "latency" in timings:
            self._interval_latency.append(timings["latency"])
        return processing

    @property
    def share_within_budget(self) -> float | None:
        return self.within_budget / self.frames if self.frames else None

    def steady_fps(self) -> float | None:
        """Frames per second over the last 40% of the recent frames (at least 3 frames;
        None before). Not from the first frame: an offline run's fast stages fill the
        queues (up to about 2 x hwm frames a link) while its slowest node still loads, and
        that backlog comes out at the speed of the stages after it, not of the pipeline."""
        count = max(3, round(0.4 * len(self._times)))
        if len(self._times) < count:
            return None
        times = list(self._times)[-count:]
        return (count - 1) / (times[-1] - times[0]) if times[-1] > times[0] else None

    def interval(self) -> dict[str, Any]:
        """Frames, frames over budget and latency since the last call; resets them."""
        report = {
            "frames": self._interval_frames,
            "over_budget": self._interval_over,
            "latency_ms": percentiles(self._interval_latency),
        }
        self._interval_frames = self._interval_over = 0
        self._interval_latency = []
        return report

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of the run so far."""
        share = self.share_within_budget
        return {
            "budget_ms": self.budget_ms,
            "frames": self.frames,
            "within_budget": self.within_budget,
            "share_within_budget": None if share is None else round(share, 4),
            "first_time": self.first_time,
            "last_time": self.last_time,
            "steady_fps": self.steady_fps(),
            "ms": {key: percentiles(values) for key, values in self._stages.items()},
        }
