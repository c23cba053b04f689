"""Many tracks: ids past 255, commands answered in the middle of a frame, and that they change
only the frames after it.

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

from pipeline.outputs.files import id_mask, read_id_mask
from pipeline.outputs.writer import MaskWriter
from pipeline.track.commands import MAX_COMMANDS_AT_ONCE
from pipeline.track.exclusive import ContestedPixels, DecodedMasks
from pipeline.track.tracking import PromptTracker, TrackOutput
from pipeline.wire.masks import RegionMask
from pipeline.wire.messages import MAX_TRACK_ID, PromptCommand, PromptReply

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


class CommandingDecoder(BoxDecoder):
    """While it decodes a frame, ``commands`` (a callable) runs in another thread: the
    decoder waits for it to finish (each command answered) before it answers itself."""

    commands = None

    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        if self.commands is not None:
            errors: list[BaseException] = []

            def run() -> None:
                try:
                    self.commands()
                except BaseException as err:  # raised in the test's thread below
                    errors.append(err)

            thread = threading.Thread(target=run)
            thread.start()
            thread.join(30)
            assert not thread.is_alive(), "a command was not answered while the decoder worked"
            if errors:
                raise errors[0]
        return super().__call__(image, boxes, mask_logits, points)


def test_commands_during_a_frame_change_only_the_frames_after_it() -> None:
    """Commands that come while a frame is decoded leave it as it began; they apply before
    the next frame, in order, exactly as if they had come between the two frames."""
    between_decoder, during_decoder = BoxDecoder(), CommandingDecoder()
    between = PromptTracker(between_decoder, frame_size=SIZE)
    during = PromptTracker(during_decoder, frame_size=SIZE)
    for i in range(40):
        assert between.commands.add(box=grid_box(i)) == during.commands.add(box=grid_box(i))

    def commands(tracker: PromptTracker, frame: int) -> list[int | None]:
        """The same commands for both trackers; the frame each takes effect on."""
        replies = [
            tracker.commands.answer(command)
            for command in (
                PromptCommand(op="add", box=grid_box(40 + frame)),
                PromptCommand(op="update", track_id=3 + frame, box=grid_box(60 + frame)),
                PromptCommand(op="remove", track_id=10 + frame),
            )
        ]
        assert all(reply.ok for reply in replies), replies
        with pytest.raises(ValueError, match=f"unknown track id {10 + frame}"):
            tracker.commands.remove(
                10 + frame
            )  # removed by the queued command: refused, nothing changes
        return [reply.frame for reply in replies]

    frames: list[int] = []  # what the commands during a frame were answered with
    for frame in range(4):
        frames.clear()
        during_decoder.commands = lambda frame=frame: frames.extend(commands(during, frame))
        got = during.step(frame)
        expected = between.step(frame)
        assert summary(got) == summary(expected)  # the frame as it began
        assert frames == [frame + 1] * 3  # each answered with the next frame
        assert commands(between, frame) == [frame + 1] * 3
        assert during.commands.listing() == between.commands.listing()
    during_decoder.commands = None
    assert summary(during.step(4)) == summary(between.step(4))
    assert between_decoder.calls == during_decoder.calls  # one batch a frame, the same ones
    assert {o.record.track_id for o in during.step(5)} == (set(range(1, 45)) - {10, 11, 12, 13})


def test_a_command_is_answered_while_the_decoder_works() -> None:
    """The decoder waits for a command's reply, from another thread: it must come while the
    decoder is still at work, not after the frame."""
    decoder = CommandingDecoder()
    tracker = PromptTracker(decoder, frame_size=SIZE)
    tracker.commands.add(box=grid_box(0))
    replies: list[PromptReply] = []
    decoder.commands = lambda: replies.append(
        tracker.commands.answer(PromptCommand(op="add", box=grid_box(1)))
    )
    outputs = tracker.step(0)
    assert [o.record.track_id for o in outputs] == [1]
    assert [(r.ok, r.track_id, r.frame) for r in replies] == [(True, 2, 1)]
    assert [(row["track_id"], row["pending"]) for row in replies[0].tracks] == [
        (1, True),
        (2, True),
    ]
    assert [(row["track_id"], row["pending"]) for row in tracker.commands.listing()] == [
        (1, False),
        (2, True),
    ]
    decoder.commands = None
    assert [o.record.track_id for o in tracker.step(1)] == [1, 2]

    class FailingDecoder(BoxDecoder):
        def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
            raise RuntimeError("CUDA out of memory")

    failing = PromptTracker(FailingDecoder(), frame_size=SIZE)
    failing.commands.add(box=grid_box(0))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # raised in the caller
        failing.step(0)
    assert failing.current_frame is None and [r["pending"] for r in failing.commands.listing()] == [
        True
    ]


def test_commands_in_the_middle_of_a_frame_apply_at_the_next() -> None:
    decoder = CommandingDecoder()
    tracker = PromptTracker(decoder, frame_size=SIZE)
    left, right = (10, 10, 40, 40), (30, 10, 60, 40)  # overlapping: right's logits win
    ids = [
        tracker.commands.add(box=box) for box in (left, right, (80, 10, 100, 30), (80, 60, 100, 80))
    ]
    first = {o.record.track_id: o for o in tracker.step(0)}
    assert not first[1].mask.dense()[20, 35]  # the overlap went to track 2
    replies: list[PromptReply] = []
    listed: list[list] = []

    def commands() -> None:
        for command in (
            PromptCommand(op="remove", track_id=2),
            PromptCommand(op="update", track_id=4, box=(100, 70, 130, 100)),
            PromptCommand(op="add", box=(120, 10, 140, 30)),
            PromptCommand(op="remove", track_id=2),  # already removed: refused
            PromptCommand(op="update", track_id=99, box=(1, 1, 5, 5)),
        ):
            replies.append(tracker.commands.answer(command))
        listed.append(tracker.commands.listing())

    decoder.commands = commands
    outputs = {o.record.track_id: o for o in tracker.step(1)}
    assert ids == [1, 2, 3, 4]
    assert [(r.ok, r.track_id, r.frame) for r in replies[:3]] == [
        (True, 2, 2),
        (True, 4, 2),
        (True, 5, 2),
    ]
    assert [r.error for r in replies[3:]] == ["unknown track id 2", "unknown track id 99"]
    # What the listing said during the frame: the queued commands, pending.
    assert [(row["track_id"], row["pending"], row["box"]) for row in listed[0]] == [
        (1, False, [10.0, 10.0, 40.0, 40.0]),
        (3, False, [80.0, 10.0, 100.0, 30.0]),
        (4, True, [100.0, 70.0, 130.0, 100.0]),
        (5, True, [120.0, 10.0, 140.0, 30.0]),
    ]
    # Frame 1 is as it began: every track, track 2 still taking the overlap.
    assert set(outputs) == {1, 2, 3, 4}
    assert not outputs[1].mask.dense()[20, 35] and outputs[2].mask.dense()[20, 35]
    assert outputs[4].record.box == (80.0, 60.0, 100.0, 80.0)
    assert [row["track_id"] for row in tracker.commands.listing()] == [1, 3, 4, 5]
    # Frame 2: the commands are in, in order.
    decoder.commands = None
    later = {o.record.track_id: o for o in tracker.step(2)}
    assert set(later) == {1, 3, 4, 5}
    assert later[1].mask.dense()[10:40, 10:40].all()  # track 2 is gone: no pixel taken
    assert later[4].record.box == (100.0, 70.0, 130.0, 100.0)
    assert later[5].record.box == (120.0, 10.0, 140.0, 30.0)
    assert not any(row["pending"] for row in tracker.commands.listing())


def test_a_flood_of_commands_waits_for_the_next_frame_in_bounded_numbers() -> None:
    """Commands queued for one frame are bounded (MAX_COMMANDS_AT_ONCE): past it a command
    is refused with the reason, nothing changes, and after the frame there is room again."""
    tracker = PromptTracker(BoxDecoder(), frame_size=SIZE)
    tid = tracker.commands.add(box=grid_box(0))
    tracker.step(0)
    for i in range(MAX_COMMANDS_AT_ONCE):
        tracker.commands.update(tid, grid_box(i % 50))
    before = tracker.commands.listing()
    reply = tracker.commands.answer(PromptCommand(op="add", box=grid_box(7)))
    assert not reply.ok and "too many commands waiting for the next frame" in reply.error
    assert tracker.commands.listing() == before
    (out,) = tracker.step(1)  # every correction applied, in order: the last one holds
    assert out.record.box == tuple(float(v) for v in grid_box((MAX_COMMANDS_AT_ONCE - 1) % 50))
    assert tracker.commands.answer(PromptCommand(op="add", box=grid_box(7))).ok


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
        assert reply["ok"] and reply["track_id"] == i + 1 and reply["frame"] == 0, reply
    run.send(embedding_message(0))
    (first,) = run.masks(1)
    assert sorted(t.track_id for t in first.tracks) == list(range(1, 301))
    # The last id there is, then one more: refused, with the reason; nothing else changes.
    reply = run.command({"op": "add", "box": [1, 1, 20, 20], "track_id": MAX_TRACK_ID})
    assert reply["ok"] and reply["track_id"] == MAX_TRACK_ID and reply["frame"] == 1
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
        writer.write(msg)
    painted = read_id_mask(tmp_path / "files" / "masks" / f"{msg.meta.frame_index:06d}.png")
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
        assert reply["ok"] and [t["track_id"] for t in reply["tracks"]] == [1]
        assert run.node.counters["frames"] < frames  # answered while still held back
        got = run.masks(frames)
        assert [m.meta.frame_index for m in got] == list(range(frames))
        print(f"held back after {stuck_at} frames: a command answered in {waited * 1000:.0f} ms")
    finally:
        run.close()
