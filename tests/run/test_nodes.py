"""The decoder and publisher nodes on their own: messages in, messages and files out.

No sockets and no runtime: each node is set up and fed as the runtime would, so what it
does with a message is seen directly. (The encoder and tracker nodes get scripted models
the same way in tests/wire/test_wire_schema.py and tests/track/test_tracking.py, and a real one in
tests/infer/test_sam_decoder.py.)
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from support.media import make_clip

from nodes.decoder import DecoderNode
from nodes.publisher import PublisherNode
from pipeline.config import DecoderConfig, PublisherConfig
from pipeline.outputs.files import read_id_mask
from pipeline.run import resume
from pipeline.video.live_source import SourceEvent
from pipeline.wire.messages import (
    SOURCE_STATES,
    STATUS_STATES,
    EndOfStream,
    FrameMessage,
    FrameMeta,
    MaskMessage,
    TrackRecord,
)


def _produce(node: DecoderNode) -> list:
    node.setup()
    try:
        return [m for m in node.produce() if m is not None]
    finally:
        node.abort()


def test_decoder_sends_every_frame_then_the_count(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=12, size=(64, 48), fps=10)
    out = _produce(DecoderNode(DecoderConfig(source=str(clip))))
    frames, end = out[:-1], out[-1]
    assert all(isinstance(m, FrameMessage) for m in frames)
    assert [m.meta.seq for m in frames] == list(range(12))
    assert [m.meta.frame_index for m in frames] == list(range(12))
    assert all(m.image.shape == (48, 64, 3) and m.image.dtype == np.uint8 for m in frames)
    assert end == EndOfStream(stream_id="cam0", frames=12, reason="eof")


def test_decoder_resumed_skips_what_was_done(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=12, size=(64, 48), fps=10)
    full = _produce(DecoderNode(DecoderConfig(source=str(clip))))
    later = _produce(DecoderNode(DecoderConfig(source=str(clip)), start_frame=5))

    def same(m: FrameMessage) -> FrameMeta:
        return msgspec.structs.replace(m.meta, capture_time=0.0)  # the one field that differs

    assert [same(m) for m in later[:-1]] == [same(m) for m in full[5:-1]]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(later, full[5:-1], strict=False))
    assert later[-1].frames == 12


def test_a_restarted_live_decoder_continues_the_stream(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=6, size=(64, 48), fps=20)
    position = tmp_path / "decoder.position"
    config = DecoderConfig(source=str(clip))
    first = _produce(DecoderNode(config, live=True, position_file=position))
    time.sleep(0.2)  # the outage: the timeline shows it
    second = _produce(DecoderNode(config, live=True, position_file=position))
    metas = [m.meta for m in first[:-1] + second[:-1]]
    assert [m.seq for m in metas] == list(range(12))
    assert [m.frame_index for m in metas] == list(range(12))
    assert [m.session for m in metas] == [0] * 6 + [1] * 6
    seconds = [m.time_seconds for m in metas]
    assert all(b > a for a, b in itertools.pairwise(seconds))
    assert seconds[6] - seconds[5] >= 0.2  # the wall time between the two processes
    assert second[-1].frames == 12


def test_a_live_sources_states_are_the_decoders_status_states() -> None:
    """One definition (SOURCE_STATES): connected is running, each outage a state of its own,
    every one a status state a reader knows."""
    node = DecoderNode(DecoderConfig(source="rtsp://camera/stream"), live=True)
    seen = {}
    for state in SOURCE_STATES:
        node._on_source_event(SourceEvent(state, session=0))  # what LiveSource calls
        seen[state] = node.state
    assert seen == {s: "running" if s == "connected" else s for s in SOURCE_STATES}
    assert set(seen.values()) <= set(STATUS_STATES)
    assert node.counters["source_stalled"] == node.counters["source_lost"] == 1


def test_a_decoder_without_a_source_says_so() -> None:
    with pytest.raises(ValueError, match=r"decoder\.source is empty"):
        DecoderNode(DecoderConfig()).setup()


def _masks(index: int, size: tuple[int, int] = (48, 64)) -> MaskMessage:
    mask = np.zeros((1, *size), dtype=bool)
    mask[0, 10 : 20 + index, 5:30] = True
    return MaskMessage(
        meta=FrameMeta(
            stream_id="cam0",
            seq=index,
            frame_index=index,
            pts=index * 100,
            time_base=(1, 1000),
            capture_time=time.time(),
        ),
        frame_size=size,
        tracks=(
            TrackRecord(
                track_id=3,
                box=(5.0, 10.0, 30.0, 20.0 + index),
                score=0.9,
                state="tracked",
                frames_since_update=0,
                innovation=0.0,
            ),
        ),
        masks=mask,
        image=np.zeros((*size, 3), dtype=np.uint8),
        timings={"decode": 1.0},
    )


def test_publisher_writes_each_frame_and_sends_it_on_without_the_image(tmp_path: Path) -> None:
    out = tmp_path / "out"
    node = PublisherNode(PublisherConfig(out=str(out)), budget_ms=100.0)
    node.setup()
    sent = [node.process(_masks(i)) for i in range(4)]
    assert node.finish(EndOfStream(stream_id="cam0", frames=4, reason="eof")) == [
        EndOfStream(stream_id="cam0", frames=4, reason="eof")
    ]
    for i, [msg] in enumerate(sent):
        assert msg.image is None and msg.meta.seq == i
        assert {"decode", "publish", "latency"} <= set(msg.timings)
    lines = [json.loads(line) for line in (out / "masks.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 1, 2, 3]
    ids = read_id_mask(out / "masks" / "000003.png")
    assert ids.shape == (48, 64) and set(np.unique(ids)) == {0, 3}
    assert (ids == 3).sum() == _masks(3).dense_masks()[0].sum()
    assert (out / "overlay.mp4").is_file() and (out / "tracks.txt").is_file()
    assert node.counters["frames"] == 4


def test_a_stopped_publisher_keeps_its_frames_for_a_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    resume.begin_run(out, {"job": "test"})
    node = PublisherNode(PublisherConfig(out=str(out), overlay=False), budget_ms=100.0)
    node.setup()
    for i in range(3):
        node.process(_masks(i))
    node.stopped()
    assert resume.interrupted_frames(out) == 3
    assert node.detail["interrupted_at"] == 3
    # The resumed publisher skips what is there and writes on.
    again = PublisherNode(
        PublisherConfig(out=str(out), overlay=False), budget_ms=100.0, resume_frames=3
    )
    again.setup()
    assert again.process(_masks(2)) == []
    again.process(_masks(3))
    again.finish(EndOfStream(stream_id="cam0", frames=4, reason="eof"))
    lines = (out / "masks.jsonl").read_text().splitlines()
    assert [json.loads(line)["frame"] for line in lines] == [0, 1, 2, 3]
    assert again.counters["frames_skipped"] == 1
    assert resume.interrupted_frames(out) is None  # finished: nothing left to resume


def test_publisher_refuses_what_is_not_masks() -> None:
    node = PublisherNode(PublisherConfig(), budget_ms=100.0)
    node.setup()
    frame = _masks(0)
    with pytest.raises(TypeError, match="publisher takes MaskMessage"):
        node.process(msgspec.structs.replace(frame.meta))  # type: ignore[arg-type]
