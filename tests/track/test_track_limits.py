"""Many tracks: ids past 255, commands answered in the middle of a frame, and what a command
does to the frame being worked on.

The first tests drive the prompt tracker with a scripted decoder (no torch). The others run a
real TrackerNode (a random-weight MobileSAM at 256 px) behind real sockets, with hundreds of
tracks, and print the control round-trip latency they measure (figures, not a timed test).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.trackers import FRAME, LiveTracker, embedding_message

from pipeline.outputs.files import MaskWriter, id_mask, read_id_mask
from pipeline.track.exclusive import ContestedPixels, DecodedMasks
from pipeline.track.tracking import PromptTracker, TrackOutput
from pipeline.wire.masks import RegionMask
from pipeline.wire.messages import (
    MAX_TRACK_ID,
)

pytestmark = pytest.mark.timeout(120)

SIZE = (120, 160)  # H, W


class BoxDecoder:
    """Each prompt's mask is its box (clipped to the frame) with score 0.9, and its logits
    in that window are the box's x1 / 10: of two overlapping masks the one further right
    takes the contested pixels. Reports contested pixels as windows, as SamMaskDecoder."""

    def __init__(self, size: tuple[int, int] = SIZE) -> None:
        self.size = size
        self.calls: list[int] = []  # rows per call

    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        self.calls.append(len(boxes))
        height, width = self.size
        masks, windows = [], []
        for box in boxes:
            x1, y1, x2, y2 = (round(float(v)) for v in box)
            x1, x2 = min(max(x1, 0), width), min(max(x2, 0), width)
            y1, y2 = min(max(y1, 0), height), min(max(y2, 0), height)
            window = np.ones((y2 - y1, x2 - x1), dtype=bool)
            masks.append(RegionMask(self.size, (x1, y1, x2, y2), window))
            windows.append(np.full(window.shape, x1 / 10, dtype=np.float32))
        n = len(boxes)
        return DecodedMasks(
            masks=tuple(masks),
            scores=np.full(n, 0.9),
            low_res_logits=np.zeros((n, 8, 8), dtype=np.float32),
            contested=ContestedPixels(windows=windows),
        )


def grid_box(i: int, size: tuple[int, int] = SIZE, cell: int = 8) -> tuple[int, ...]:
    """The i-th cell of a grid over the frame, grown by 2 px so neighbours overlap."""
    per_row = size[1] // cell
    y, x = divmod(i, per_row)
    return (x * cell, y * cell, x * cell + cell + 2, y * cell + cell + 2)


def summary(outputs: list[TrackOutput]) -> list[tuple]:
    return [(o.record, o.mask.dense().tobytes()) for o in outputs]


def test_a_frame_decoded_while_commands_are_served_gives_the_same_outputs() -> None:
    whole_decoder, served_decoder = BoxDecoder(), BoxDecoder()
    whole = PromptTracker(whole_decoder, frame_size=SIZE)
    served = PromptTracker(served_decoder, frame_size=SIZE)
    for i in range(40):
        assert whole.add(box=grid_box(i)) == served.add(box=grid_box(i))
    betweens: list[None] = []
    for frame in range(4):
        expected = whole.step(frame)
        got = served.step(frame, between=lambda: betweens.append(None))
        assert summary(got) == summary(expected)
    assert whole_decoder.calls == served_decoder.calls == [40] * 4  # one batch a frame
    assert len(betweens) >= 4 * (1 + 40)  # while decoding, then after every track


def test_between_runs_while_the_decoder_works() -> None:
    """The decoder waits for a command that only `between` can serve: it must come while
    the decoder is still at work, not after it."""
    served = threading.Event()

    class WaitingDecoder(BoxDecoder):
        def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
            assert served.wait(30), "between never ran while the decoder worked"
            return super().__call__(image, boxes, mask_logits, points)

    tracker = PromptTracker(WaitingDecoder(), frame_size=SIZE)
    tracker.add(box=grid_box(0))
    outputs = tracker.step(0, between=served.set)
    assert [o.record.track_id for o in outputs] == [1]

    class FailingDecoder(BoxDecoder):
        def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
            raise RuntimeError("CUDA out of memory")

    failing = PromptTracker(FailingDecoder(), frame_size=SIZE)
    failing.add(box=grid_box(0))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # raised in the caller
        failing.step(0, between=lambda: None)
    assert failing.current_frame is None and [r["pending"] for r in failing.list()] == [True]


class GatedDecoder(BoxDecoder):
    """Holds its answer until ``gate`` is set (when one is given)."""

    gate: threading.Event | None = None

    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        if self.gate is not None:
            assert self.gate.wait(30), "between never ran while the decoder worked"
        return super().__call__(image, boxes, mask_logits, points)


def test_commands_in_the_middle_of_a_frame_leave_their_tracks_as_they_made_them() -> None:
    decoder = GatedDecoder()
    tracker = PromptTracker(decoder, frame_size=SIZE)
    left, right = (10, 10, 40, 40), (30, 10, 60, 40)  # overlapping: right's logits win
    ids = [tracker.add(box=box) for box in (left, right, (80, 10, 100, 30), (80, 60, 100, 80))]
    first = {o.record.track_id: o for o in tracker.step(0)}
    assert not first[1].mask.dense()[20, 35]  # the overlap went to track 2
    added: list[int] = []
    decoder.gate = threading.Event()
    removed_after_commit = False

    def between() -> None:
        nonlocal removed_after_commit
        if not decoder.gate.is_set():
            # While the decoder works: tracks of this frame not committed yet.
            tracker.remove(2)
            tracker.update_box(4, (100, 70, 130, 100))
            added.append(tracker.add(box=(120, 10, 140, 30)))
            with pytest.raises(RuntimeError, match="middle of step"):
                tracker.lose_all()
            with pytest.raises(RuntimeError, match="middle of step"):
                tracker.step(9)
            with pytest.raises(ValueError, match="unknown track id 2"):
                tracker.remove(2)  # a bad command is still refused, changing nothing
            decoder.gate.set()
        elif not removed_after_commit and tracker.tracks[3].hits == 2:
            tracker.remove(3)  # just after its frame was committed
            removed_after_commit = True

    outputs = {o.record.track_id: o for o in tracker.step(1, between=between)}
    assert ids == [1, 2, 3, 4] and added == [5] and removed_after_commit
    # The touched tracks are not in the frame's outputs; the others are, as usual.
    assert set(outputs) == {1}
    # The removed track took no pixels: track 1 has its whole own mask back.
    assert outputs[1].mask.dense()[10:40, 10:40].all()
    assert [row["id"] for row in tracker.list()] == [1, 4, 5]
    # Next frame: the corrected track starts at its new box, the new one is there.
    decoder.gate = None
    later = {o.record.track_id: o for o in tracker.step(2, between=lambda: None)}
    assert set(later) == {1, 4, 5}
    assert later[4].record.box == (100.0, 70.0, 130.0, 100.0)
    assert later[5].record.box == (120.0, 10.0, 140.0, 30.0)


# --------------------------------------------------------------------------- a real node


@pytest.fixture
def live_tracker(checkpoint: Path, tmp_path: Path) -> Iterator[LiveTracker]:
    tracker = LiveTracker(checkpoint, tmp_path)
    tracker.wait_for(lambda: tracker.node.tracker is not None)  # the model is loaded
    yield tracker
    tracker.close()


def cell_box(i: int, count: int) -> list[float]:
    """One of ``count`` boxes on a grid over the frame (neighbours overlap a little)."""
    per_row = int(np.ceil(np.sqrt(count * FRAME[1] / FRAME[0])))
    rows = int(np.ceil(count / per_row))
    w, h = FRAME[1] / per_row, FRAME[0] / rows
    y, x = divmod(i, per_row)
    return [x * w, y * h, min((x + 1) * w + 1, FRAME[1]), min((y + 1) * h + 1, FRAME[0])]


@pytest.mark.timeout(900)
def test_300_objects_through_the_control_socket(live_tracker: LiveTracker, tmp_path: Path) -> None:
    """Ids past 255 are given out and published; at the id limit an add is refused with the
    reason, and the run goes on: the masks keep coming, 16-bit PNGs hold their ids."""
    run = live_tracker
    for i in range(300):
        reply = run.command({"op": "add", "box": cell_box(i, 300)})
        assert reply["ok"] and reply["track_id"] == i + 1, reply
    run.send(embedding_message(0))
    (first,) = run.masks(1)
    assert sorted(t.track_id for t in first.tracks) == list(range(1, 301))
    # The last id there is, then one more: refused, with the reason; nothing else changes.
    reply = run.command({"op": "add", "box": [1, 1, 20, 20], "track_id": MAX_TRACK_ID})
    assert reply["ok"] and reply["track_id"] == MAX_TRACK_ID
    refused = run.command({"op": "add", "box": [1, 1, 20, 20]})
    assert not refused["ok"] and "track id limit reached" in refused["error"], refused
    too_big = run.command({"op": "add", "box": [1, 1, 20, 20], "track_id": MAX_TRACK_ID + 1})
    assert not too_big["ok"] and f"1..{MAX_TRACK_ID}" in too_big["error"], too_big
    listing = run.command({"op": "list"})
    assert listing["ok"] and len(listing["tracks"]) == 301
    # The run goes on: masks of every track, ids > 255 included.
    run.send(embedding_message(1))
    run.send(embedding_message(2))
    later = run.masks(2)
    ids = {t.track_id for msg in later for t in msg.tracks}
    assert {256, 300, MAX_TRACK_ID} <= ids
    assert run.node.counters["bad_commands"] == 2
    print(
        f"300 objects + id {MAX_TRACK_ID}: the next add refused ({refused['error']!r}); "
        f"frames {[m.meta.frame_index for m in later]} came with {len(later[-1].tracks)} tracks"
    )
    # Those masks written as files: the frame's PNG is 16-bit and holds every id exactly.
    msg = later[-1]
    with MaskWriter(tmp_path / "files", write_overlay=False) as writer:
        writer.write(
            frame_index=0,
            seq=msg.meta.seq,
            pts=msg.meta.pts,
            time_base=msg.meta.time_base,
            frame_size=msg.frame_size,
            tracks=msg.tracks,
            masks=msg.masks,
            image=None,
        )
    painted = read_id_mask(tmp_path / "files" / "masks" / "000000.png")
    expected = id_mask(msg.masks, [t.track_id for t in msg.tracks], msg.frame_size)
    assert painted.dtype == np.uint16 and np.array_equal(painted, expected)
    assert int(painted.max()) > 255


def round_trips(run: LiveTracker, stop: threading.Event, sink: list[float]) -> None:
    """Commands one after another until ``stop``: add, list, remove of the added one."""

    def timed(command: dict) -> dict:
        began = time.perf_counter()
        reply = run.command(command)
        sink.append(time.perf_counter() - began)
        assert reply["ok"], reply
        return reply

    while not stop.is_set():
        added = timed({"op": "add", "box": [5, 5, 30, 30]})
        timed({"op": "list"})
        timed({"op": "remove", "track_id": added["track_id"]})


@pytest.mark.timeout(900)
def test_control_latency_with_200_tracks(live_tracker: LiveTracker) -> None:
    """With 200 tracks a frame takes seconds on a CPU; a command must not wait for it.
    Prints the measured round trips (p50 / p95 / max) beside the frame time."""
    run = live_tracker
    for i in range(200):
        assert run.command({"op": "add", "box": cell_box(i, 200)})["ok"]
    run.send(embedding_message(0))
    run.masks(1)  # the first frame (which also probes the decoder's window geometry)
    frames = 4
    for frame in range(1, frames + 1):
        run.send(embedding_message(frame))
    latencies: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=round_trips, args=(run, stop, latencies), daemon=True)
    started = time.perf_counter()
    thread.start()
    got = run.masks(frames)
    stop.set()
    thread.join(120)
    elapsed = time.perf_counter() - started
    assert not thread.is_alive()
    assert all(len(m.tracks) >= 200 for m in got)
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000
    frame_ms = statistics.median(list(run.node.durations_ms)[-frames:])
    print(
        f"control round trips with 200 tracks, during {frames} frames ({elapsed:.1f} s, "
        f"tracker {frame_ms:.0f} ms a frame): {len(ordered)} commands, p50 {p50:.1f} ms, "
        f"p95 {p95:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )
    # One client, one command at a time: answered only between frames, it would get about
    # one answer a frame.
    assert len(ordered) > 3 * frames
    assert ordered[-1] < 5.0  # a loose sanity bound: far below a frame's time on a CPU


def test_commands_are_answered_while_the_next_node_holds_the_tracker_back(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Lossless mode: a slow next node (a publisher writing hundreds of masks) makes the
    tracker wait to send; it answers commands meanwhile."""
    run = LiveTracker(checkpoint, tmp_path, hwm=1)
    try:
        run.wait_for(lambda: run.node.tracker is not None)
        assert run.command({"op": "add", "box": [10, 10, 200, 150]})["ok"]
        frames = 8
        for frame in range(frames):  # frames of 3 MB with their image: no queue holds many
            run.send(embedding_message(frame, original=(1080, 960), image=True))
        run.wait_for(lambda: run.node.counters.get("frames", 0) >= 2)
        time.sleep(1.0)  # nothing is read: the tracker is stuck sending
        stuck_at = run.node.counters["frames"]
        assert stuck_at < frames
        began = time.perf_counter()
        reply = run.command({"op": "list"}, timeout_s=30)
        waited = time.perf_counter() - began
        assert reply["ok"] and [t["id"] for t in reply["tracks"]] == [1]
        assert run.node.counters["frames"] < frames  # answered while still held back
        got = run.masks(frames)
        assert [m.meta.frame_index for m in got] == list(range(frames))
        print(f"held back after {stuck_at} frames: a command answered in {waited * 1000:.0f} ms")
    finally:
        run.close()
