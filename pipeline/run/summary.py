"""What a run did, from each node's last status message: the summary printed at its end,
and the progress bar while it runs."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.run.graph import NODE_NAMES, SINK, SOURCE, links
from pipeline.wire.messages import StatusMessage


@dataclass
class RunSummary:
    """What a run did: frame counts, throughput, per-stage milliseconds and, per frame, the
    stage times, latency and budget as the sink measured them."""

    frames_in: int
    frames_out: int
    wall_s: float
    stages: dict[str, dict[str, Any]]
    outputs: dict[str, str] = field(default_factory=dict)
    mode: str = "offline"
    timings: dict[str, Any] = field(default_factory=dict)  # FrameTimings.summary()
    dropped: dict[str, int] = field(default_factory=dict)  # frames lost before each node
    in_flight: int = 0  # frames a node had taken but not passed on when the run was stopped
    reconnects: int = 0
    stopped_by: str | None = None  # the signal that ended the run, None when it ran out
    interrupted_at: int | None = None  # offline run stopped: frames complete in its outputs
    timestamps: dict[str, Any] = field(default_factory=dict)  # the decoder's repairs, if any
    resumed_frames: int = 0  # frames an interrupted run had written before this one resumed
    restarts: str = ""  # the nodes that died and were restarted, when
    # Nodes that had not stopped within the grace period of the end and were killed.
    killed: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        """Frames out per second of the whole run, model loading included."""
        return self.frames_out / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_fps(self) -> float | None:
        """Frames out per second once the run is in its stride: over its last frames
        (`pipeline.run.live.FrameTimings.steady_fps`), after any backlog that queued while the
        models loaded (None with fewer than 3 frames)."""
        return self.timings.get("steady_fps")

    def format(self) -> str:
        lines = [
            f"frames in {self.frames_in}, out {self.frames_out}, {self.wall_s:.1f} s: "
            f"{self.fps:.2f} frames/s with model loading"
            + (f", {self.steady_fps:.2f} frames/s once running" if self.steady_fps else "")
            + f" ({self.mode})"
            + (f", stopped by {self.stopped_by}" if self.stopped_by else ""),
            f"{'stage':<10} {'messages':>8} {'median ms':>10} {'p95 ms':>8}",
        ]
        for name in NODE_NAMES:
            s = self.stages.get(name, {})
            if s.get("messages"):
                lines.append(
                    f"{name:<10} {s['messages']:>8} {s['ms_median']:>10.1f} {s['ms_p95']:>8.1f}"
                )
        ms = self.timings.get("ms", {})
        if self.mode == "live":
            # Budget and latency are live figures: an offline run is lossless and as fast
            # as it goes, so its frames wait in queues by design.
            if ms.get("latency"):
                lines.append(
                    f"per frame: processing median {ms['processing']['median']:.1f} ms, p95 "
                    f"{ms['processing']['p95']:.1f} ms; capture-to-publish latency median "
                    f"{ms['latency']['median']:.1f} ms, p95 {ms['latency']['p95']:.1f} ms"
                )
            share = self.timings.get("share_within_budget")
            if share is not None:
                lines.append(
                    f"budget {self.timings['budget_ms']:g} ms per frame: {100 * share:.1f}% of "
                    f"{self.timings['frames']} frames within it"
                )
            drops = ", ".join(f"before {node} {n}" for node, n in self.dropped.items())
            lines.append(
                f"dropped (newest frame wins): {drops or 'none'}; in flight at "
                f"stop: {self.in_flight}; source reconnects: {self.reconnects}"
            )
        if self.timestamps.get("repaired_frames"):
            methods = ", ".join(
                f"{k} {v}" for k, v in self.timestamps.get("methods", {}).items() if v
            )
            lines.append(
                f"timestamps repaired on {self.timestamps['repaired_frames']} frames from frame "
                f"{self.timestamps.get('first_frame')} ({methods}): the outputs' pts are the "
                "repaired, increasing ones; masks.jsonl keeps the file's as source_pts"
            )
        if self.resumed_frames:
            lines.append(f"resumed after the {self.resumed_frames} frames already written")
        if self.restarts:
            lines.append(f"nodes restarted after dying: {self.restarts}")
        if self.killed:
            lines.append(f"killed, not stopped within the grace period: {', '.join(self.killed)}")
        if self.interrupted_at is not None:
            lines.append(
                f"interrupted at frame {self.interrupted_at}: the outputs hold frames 0-"
                f"{self.interrupted_at - 1}, complete; run the same command with --resume to "
                "continue from there"
            )
        lines.extend(f"{kind}: {path}" for kind, path in sorted(self.outputs.items()))
        return "\n".join(lines)


def dropped_frames(last: dict[str, StatusMessage]) -> dict[str, int]:
    """Frames each node's upstream sent that the node never processed (newest frame wins)."""
    dropped = {}
    for upstream, node in links():
        if upstream in last and node in last:
            sent = last[upstream].counters.get("frames", 0)
            received = last[node].counters.get("frames_in", 0)
            dropped[node] = max(0, sent - received)
    return dropped


def frames_in_flight(last: dict[str, StatusMessage]) -> int:
    """Frames taken by a node but not passed on: only a stopped run has any."""
    return sum(
        max(0, msg.counters.get("frames_in", 0) - msg.counters.get("frames", 0))
        for name, msg in last.items()
        if name != SOURCE.name
    )


def summarize(
    last: dict[str, StatusMessage], wall_s: float, mode: str, stopped_by: str | None = None
) -> RunSummary:
    """The summary from each node's last status message."""
    source, sink = last.get(SOURCE.name), last.get(SINK.name)
    return RunSummary(
        frames_in=source.counters.get("frames", 0) if source else 0,
        frames_out=sink.counters.get("frames", 0) if sink else 0,
        wall_s=wall_s,
        stages={name: msg.detail.get("stats", {}) for name, msg in last.items()},
        outputs=sink.detail.get("outputs", {}) if sink else {},
        mode=mode,
        timings=sink.detail.get("timings", {}) if sink else {},
        dropped=dropped_frames(last),
        in_flight=frames_in_flight(last),
        reconnects=source.counters.get("reconnects", 0) if source else 0,
        stopped_by=stopped_by,
        interrupted_at=sink.detail.get("interrupted_at") if sink else None,
        timestamps=source.detail.get("timestamps") or {} if source else {},
        resumed_frames=sink.counters.get("frames_resumed", 0) if sink else 0,
    )


def update_progress(bar: tqdm | None, last: dict[str, StatusMessage], live: bool) -> tqdm | None:
    """Frames published: out of the total where the container (or --max-frames) gives one,
    so the bar has an ETA; a live run shows its latency and drops instead."""
    source, sink = last.get(SOURCE.name), last.get(SINK.name)
    if bar is None and source is not None and "frame_count_hint" in source.detail:
        bar = tqdm(
            total=None if live else source.detail.get("frame_count_hint"),
            unit="frame",
            desc="samstream",
            file=sys.stderr,
            dynamic_ncols=True,
        )
    if bar is not None and sink is not None:
        done = sink.counters.get("frames", 0) + sink.counters.get("frames_resumed", 0)
        if live:
            latency = (sink.detail.get("interval") or {}).get("latency_ms") or {}
            dropped = sum(dropped_frames(last).values())
            bar.set_postfix_str(
                f"latency {latency.get('median', 0):.0f} ms, dropped {dropped}", refresh=False
            )
        bar.update(done - bar.n)
    return bar
