"""Timestamp repair: `TimestampRepairer` on number sequences, then `VideoSource` on real files
with broken timestamps, encoded by PyAV in tmp_path, and on OpenCV's samples where installed.

Every file test first checks, with a plain PyAV decode, that the file really has the fault it
stands for (reordered, missing or backward pts), so a passing test means a repair happened.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from support.media import make_b_frame_avi, make_clip, make_concatenated_ts, make_pts_as_dts_mp4

from nodes.decoder import DecoderNode
from pipeline.config import DecoderConfig
from pipeline.video.sources import (
    TIMESTAMP_LOOKAHEAD,
    DecodedFrame,
    SourceSpec,
    VideoSource,
    parse_source,
)
from pipeline.video.timestamps import (
    REPAIR_METHODS,
    RepairedTimestamp,
    Timeline,
    TimestampRepairer,
)
from pipeline.wire.messages import FrameMessage, FrameMeta, MessageError, decode

pytestmark = pytest.mark.timeout(60)

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
NO_REPAIR = {"repaired_frames": 0, "first_frame": None, "methods": {}}

# The first frames of OpenCV's Megamind.avi as FFmpeg decodes them (packed B-frames): the pts
# swap in pairs while the dts count up; the last frame has no dts.
MEGAMIND_PTS = [1, 2, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13]
MEGAMIND_DTS = [*range(1, 14), None]


def strictly_increasing(values: Sequence[int | None]) -> bool:
    return all(a is not None and b is not None and b > a for a, b in itertools.pairwise(values))


def repair(
    pts: Sequence[int | None],
    dts: Sequence[int | None] | None = None,
    *,
    durations: Sequence[int | None] | None = None,
    frame_duration: int = 1,
    discontinuity_ticks: int = 100,
    lookahead: int = 8,
) -> tuple[list[RepairedTimestamp[int]], TimestampRepairer[int]]:
    """Push the sequence (items: the frame numbers) through a repairer, then drain it."""
    repairer: TimestampRepairer[int] = TimestampRepairer(
        frame_duration=frame_duration,
        discontinuity_ticks=discontinuity_ticks,
        lookahead=lookahead,
    )
    dts = [None] * len(pts) if dts is None else dts
    durations = [None] * len(pts) if durations is None else durations
    out: list[RepairedTimestamp[int]] = []
    for i, (p, d, duration) in enumerate(zip(pts, dts, durations, strict=True)):
        decided = repairer.push(i, pts=p, dts=d, duration=duration)
        out += [] if decided is None else [decided]
    out += repairer.drain()
    assert [r.item for r in out] == [r.index for r in out] == list(range(len(pts)))
    return out, repairer


# -- the repairer on number sequences ---------------------------------------------------------


def test_megamind_pattern_becomes_the_dts_from_the_first_reordered_frame() -> None:
    out, repairer = repair(MEGAMIND_PTS, MEGAMIND_DTS)
    # The look-ahead sees the pts fault of frame 4 while frame 3 is still held: dts from
    # frame 3 on, exactly, and the last frame (no dts) one frame after the one before.
    assert [r.pts for r in out] == list(range(1, 15))
    assert [r.method for r in out[:3]] == [None] * 3
    assert out[3].method == "dts" and out[3].reason == "pts out of order, using dts"
    assert out[-1].method == "frame_rate" and out[-1].source_pts == 13
    repaired = [r.index for r in out if r.repaired]
    assert repaired == [i for i, p in enumerate(MEGAMIND_PTS) if p != i + 1]
    assert repairer.report == {
        "repaired_frames": len(repaired),
        "first_frame": 3,
        "methods": {"dts": len(repaired) - 1, "frame_rate": 1},
    }


def test_without_lookahead_the_fault_is_seen_one_frame_late() -> None:
    # Live sources decide at once, as FFmpeg does: frame 3 keeps its pts 5, and what follows
    # is kept after it.
    out, repairer = repair(MEGAMIND_PTS, MEGAMIND_DTS, lookahead=0)
    assert out[3].pts == 5 and not out[3].repaired
    assert strictly_increasing([r.pts for r in out])
    assert repairer.report["first_frame"] == 4
    # Never more than one tick away from the dts: no drift either.
    tail = zip(out[4:-1], MEGAMIND_DTS[4:-1], strict=True)
    assert all(d is not None and 0 <= r.pts - d <= 1 for r, d in tail)


def test_lookahead_holds_frames_back_until_drained() -> None:
    repairer: TimestampRepairer[str] = TimestampRepairer(
        frame_duration=1, discontinuity_ticks=10, lookahead=2
    )
    assert repairer.push("a", pts=0, dts=0) is None
    assert repairer.push("b", pts=1, dts=1) is None  # two held
    decided = repairer.push("c", pts=2, dts=2)
    assert decided is not None and decided.item == "a"
    assert [(r.item, r.pts) for r in repairer.drain()] == [("b", 1), ("c", 2)]
    assert list(repairer.drain()) == []  # none held any more


def test_drain_hands_out_one_at_a_time() -> None:
    repairer: TimestampRepairer[int] = TimestampRepairer(
        frame_duration=1, discontinuity_ticks=10, lookahead=8
    )
    for i in range(5):
        assert repairer.push(i, pts=i, dts=i) is None
    assert [r.item for r in itertools.islice(repairer.drain(), 2)] == [0, 1]
    # The three not taken are still held, and come next.
    assert [r.item for r in repairer.drain()] == [2, 3, 4]


def test_no_timestamps_at_all_use_the_frame_rate() -> None:
    out, repairer = repair([None] * 5, frame_duration=512)
    assert [r.pts for r in out] == [0, 512, 1024, 1536, 2048]
    assert {r.method for r in out} == {"frame_rate"}
    assert out[0].reason == "no pts or dts, using the frame rate"
    assert repairer.report == {"repaired_frames": 5, "first_frame": 0, "methods": {"frame_rate": 5}}
    # A frame's own duration wins over the average rate.
    out, _ = repair([None] * 4, durations=[10, 20, 30, 40], frame_duration=512)
    assert [r.pts for r in out] == [0, 10, 30, 60]


def test_missing_pts_in_between_are_filled_after_the_previous_frame() -> None:
    out, repairer = repair([0, 10, None, 30, None, None, 60], frame_duration=10)
    assert [r.pts for r in out] == [0, 10, 20, 30, 40, 50, 60]
    assert [r.source_pts for r in out] == [0, 10, None, 30, None, None, 60]
    assert repairer.report["methods"] == {"frame_rate": 3}


def test_missing_pts_use_the_dts() -> None:
    out, repairer = repair([0, None, 2, None], [0, 1, 2, 3])
    assert [r.pts for r in out] == [0, 1, 2, 3]
    assert out[1].method == "dts" and out[1].reason == "no pts, using dts"
    assert repairer.report == {"repaired_frames": 2, "first_frame": 1, "methods": {"dts": 2}}


def test_concatenation_continues_the_timeline_with_its_spacing() -> None:
    first, second = list(range(0, 100, 10)), list(range(5, 55, 10))
    out, repairer = repair(
        first + second, first + second, frame_duration=10, discontinuity_ticks=50
    )
    assert [r.pts for r in out] == list(range(0, 150, 10))
    assert [r.source_pts for r in out[10:]] == second
    assert out[10].reason is not None and "jumped back by 85 ticks" in out[10].reason
    assert repairer.report == {
        "repaired_frames": 5,
        "first_frame": 10,
        "methods": {"discontinuity": 5},
    }


def test_small_steps_back_are_nudged_one_tick() -> None:
    out, repairer = repair([0, 10, 20, 15, 30, 40, 40, 50], discontinuity_ticks=100)
    assert [r.pts for r in out] == [0, 10, 20, 21, 30, 40, 41, 50]
    assert repairer.report == {"repaired_frames": 2, "first_frame": 3, "methods": {"nudged": 2}}


@pytest.mark.parametrize(
    "pts",
    [
        list(range(30)),
        [0, 40, 80, 200, 210, 220, 400, 440, 1000, 1033],  # variable frame rate
        [0, 11, 17, 24, 31, 37, 43, 49, 56, 61],  # tree.avi: increasing, uneven gaps
        [-1024, -512, 0, 512, 1024],  # an MP4 edit list can start below zero
    ],
)
def test_well_formed_timestamps_are_kept_exactly(pts: list[int]) -> None:
    for dts in (None, pts, [p - 2 for p in pts]):
        for lookahead in (0, 8):
            out, repairer = repair(pts, dts, lookahead=lookahead)
            assert [r.pts for r in out] == pts
            assert not any(r.repaired for r in out)
            assert repairer.report == NO_REPAIR


def test_reordered_dts_do_not_override_good_pts() -> None:
    # Frame-threaded decoders hand out some frames with a later packet's dts: pts stay.
    pts = list(range(0, 100, 10))
    dts = [0, 10, 20, 5, 40, 50, 6, 70, 80, 90]
    out, repairer = repair(pts, dts)
    assert [r.pts for r in out] == pts and repairer.report == NO_REPAIR


def test_random_garbage_comes_out_strictly_increasing() -> None:
    rng = random.Random(20240611)
    for _ in range(300):
        n = rng.randint(1, 60)

        def garbage() -> int | None:
            return None if rng.random() < 0.2 else rng.randint(-1000, 1000)

        pts = [garbage() for _ in range(n)]
        dts = sorted(v for v in (garbage() for _ in range(n)) if v is not None)
        dts_or_none = [dts.pop(0) if dts and rng.random() < 0.7 else garbage() for _ in range(n)]
        durations = [rng.choice([None, rng.randint(-5, 50)]) for _ in range(n)]
        out, repairer = repair(
            pts,
            dts_or_none,
            durations=durations,
            frame_duration=rng.randint(1, 40),
            discontinuity_ticks=rng.randint(1, 500),
            lookahead=rng.randint(0, 10),
        )
        assert strictly_increasing([r.pts for r in out])
        for r, source in zip(out, pts, strict=True):
            assert r.source_pts == source
            assert r.repaired == (r.pts != source)
            assert (r.method in REPAIR_METHODS) if r.repaired else (r.method is None)
        report = repairer.report
        repaired = [r.index for r in out if r.repaired]
        assert report["repaired_frames"] == len(repaired) == sum(report["methods"].values())
        assert report["first_frame"] == (repaired[0] if repaired else None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"frame_duration": 0, "discontinuity_ticks": 10}, "frame_duration must be >= 1"),
        ({"frame_duration": 1, "discontinuity_ticks": 0}, "discontinuity_ticks must be >= 1"),
        ({"frame_duration": 1, "discontinuity_ticks": 1, "lookahead": -1}, "lookahead"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TimestampRepairer(**kwargs)


# -- Timeline: pieces whose pts restart, on one timeline ---------------------------------------


def test_timeline_starts_at_zero_in_the_first_frames_time_base() -> None:
    timeline = Timeline()
    ms = Fraction(1, 1000)
    # A webcam's pts count from boot; the timeline counts from its first frame.
    placed = [timeline.place(p, ms, 100.0 + p / 1000) for p in (5_000_000, 5_000_040, 5_000_200)]
    assert placed == [0, 40, 200]  # variable spacing kept
    assert timeline.time_base == ms


def test_timeline_places_a_new_piece_by_the_wall_clock_and_keeps_its_spacing() -> None:
    timeline = Timeline(Fraction(1, 100), last_pts=1000, last_capture=50.0)
    timeline.new_piece()
    # The piece's own pts restart near 0, in another time base (1/90000 s); it comes 3 s
    # after the last frame, so it starts 300 ticks later, then keeps its 40 ms spacing.
    tick = Fraction(1, 90000)
    assert [timeline.place(p, tick, 53.0 + p / 90000) for p in (0, 3600, 7200)] == [
        1300,
        1304,
        1308,
    ]
    timeline.new_piece()  # at once: at least one tick after the last frame
    assert timeline.place(0, tick, 53.08) == 1309
    assert timeline.place(-3600, tick, 53.12) == 1310  # a clock stepping back keeps the order
    assert timeline.place(90000, tick, 54.1) == 1409  # and the piece's spacing goes on


# -- VideoSource on real files -----------------------------------------------------------------


@dataclass(frozen=True)
class PlainDecode:
    """What PyAV itself reports for a file, decoded without VideoSource (same threading)."""

    pts: list[int | None]
    dts: list[int | None]
    durations: list[int]
    time_base: Fraction
    rate: Fraction | None


def plain_decode(path: Path) -> PlainDecode:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [(f.pts, f.dts, f.duration) for f in container.decode(stream)]
        return PlainDecode(
            pts=[f[0] for f in frames],
            dts=[f[1] for f in frames],
            durations=[f[2] for f in frames],
            time_base=stream.time_base,
            rate=stream.average_rate,
        )


def read_all(
    path: Path, caplog: pytest.LogCaptureFixture, *, kind: str = "file"
) -> tuple[VideoSource, list[DecodedFrame], list[logging.LogRecord]]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.video.sources"):
        with VideoSource(SourceSpec(url=str(path), kind=kind)) as source:
            frames = list(source)
    warnings = [r for r in caplog.records if "timestamps repaired" in r.getMessage()]
    return source, frames, warnings


def check_repair(
    path: Path, caplog: pytest.LogCaptureFixture, *, kind: str = "file"
) -> tuple[list[DecodedFrame], PlainDecode, dict]:
    """The properties every file must have: one frame per decoded frame, strictly
    increasing pts, source_pts exactly where the pts changed, the report and one warning."""
    plain = plain_decode(path)
    source, frames, warnings = read_all(path, caplog, kind=kind)
    assert len(frames) == len(plain.pts) == source.frames_decoded
    assert [f.meta.frame_index for f in frames] == list(range(len(frames)))
    assert strictly_increasing([f.meta.pts for f in frames])
    changed = [i for i, (f, p) in enumerate(zip(frames, plain.pts, strict=True)) if f.meta.pts != p]
    for frame, original in zip(frames, plain.pts, strict=True):
        assert frame.meta.source_pts == (original if frame.meta.pts != original else None)
    report = source.timestamp_report
    assert report["repaired_frames"] == len(changed) == sum(report["methods"].values())
    assert report["first_frame"] == (changed[0] if changed else None)
    if changed:
        assert len(warnings) == 1
        assert warnings[0].levelno == logging.WARNING
        assert (
            warnings[0]
            .getMessage()
            .startswith(f"{path}: timestamps repaired from frame {changed[0]}: ")
        )
    else:
        assert warnings == [] and report == NO_REPAIR
    return frames, plain, report


def check_is_the_dts(frames: list[DecodedFrame], plain: PlainDecode) -> None:
    """Repaired to the dts exactly; frames without one (the last) a frame apart."""
    for i, (frame, dts) in enumerate(zip(frames, plain.dts, strict=True)):
        if dts is not None:
            assert frame.meta.pts == dts, f"frame {i}"
        else:
            assert frame.meta.pts == frames[i - 1].meta.pts + plain.durations[i - 1], f"frame {i}"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("timestamps")


def test_mp4_with_pts_written_as_dts_gets_the_dts(
    media: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_pts_as_dts_mp4(media / "pts_as_dts.mp4", frames=30)
    plain = plain_decode(path)
    assert not strictly_increasing(plain.pts), "the file must decode with reordered pts"
    assert strictly_increasing([d for d in plain.dts if d is not None])
    frames, plain, report = check_repair(path, caplog)
    check_is_the_dts(frames, plain)
    assert set(report["methods"]) <= {"dts", "frame_rate"}
    seconds = [f.meta.pts * Fraction(*f.meta.time_base) for f in frames]  # type: ignore[operator]
    steps = {b - a for a, b in itertools.pairwise(seconds)}
    assert steps == {Fraction(1, 25)}  # one frame apart everywhere: no drift, no squeeze


def test_avi_with_b_frames_gets_the_dts(media: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = make_b_frame_avi(media / "b_frames.avi", frames=30)
    plain = plain_decode(path)
    assert not strictly_increasing(plain.pts), "the file must decode with reordered pts"
    frames, plain, report = check_repair(path, caplog)
    check_is_the_dts(frames, plain)
    assert report["repaired_frames"] > 0


def test_raw_h264_without_timestamps_uses_the_frame_rate(
    media: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_clip(media / "raw.h264", frames=20)
    plain = plain_decode(path)
    assert plain.pts == [None] * 20 == plain.dts, "the file must decode without timestamps"
    frames, plain, report = check_repair(path, caplog)
    assert plain.rate == 25
    tick = round(1 / (plain.rate * plain.time_base))
    assert [f.meta.pts for f in frames] == [i * tick for i in range(20)]
    assert [f.meta.source_pts for f in frames] == [None] * 20
    assert report == {"repaired_frames": 20, "first_frame": 0, "methods": {"frame_rate": 20}}
    assert "no pts or dts, using the frame rate" in caplog.text


def test_concatenated_ts_continues_after_the_junction_with_the_new_size(
    media: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_concatenated_ts(media / "joined.ts", sizes=((160, 120), (128, 96)), frames=30)
    plain = plain_decode(path)
    assert plain.pts[30] is not None and plain.pts[29] is not None
    assert plain.pts[30] < plain.pts[29], "the timestamps must jump back at the junction"
    frames, plain, report = check_repair(path, caplog)
    assert [f.image.shape for f in frames] == [(120, 160, 3)] * 30 + [(96, 128, 3)] * 30
    assert [f.meta.pts for f in frames[:30]] == plain.pts[:30]
    # The second part keeps its own spacing, one frame after the first part's last frame.
    offset = frames[30].meta.pts - plain.pts[30]  # type: ignore[operator]
    assert frames[30].meta.pts == frames[29].meta.pts + plain.durations[29]  # type: ignore[operator]
    assert [f.meta.pts for f in frames[30:]] == [p + offset for p in plain.pts[30:]]  # type: ignore[operator]
    assert report == {"repaired_frames": 30, "first_frame": 30, "methods": {"discontinuity": 30}}
    assert "jumped back" in caplog.text


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("h264_b_frames.mp4", lambda path: make_clip(path, frames=30)),
        ("intra.mkv", lambda path: make_clip(path, frames=20, codec="mpeg4")),
        ("clip.ts", lambda path: make_clip(path, frames=20)),
        (
            "vfr.mp4",
            lambda path: make_clip(
                path,
                frames=10,
                pts=[0, 40, 80, 200, 210, 220, 400, 440, 1000, 1033],
                time_base=Fraction(1, 1000),
            ),
        ),
        (
            "vfr.mkv",
            lambda path: make_clip(
                path,
                frames=10,
                pts=[0, 33, 50, 51, 300, 310, 320, 900, 901, 2000],
                time_base=Fraction(1, 1000),
            ),
        ),
    ],
)
def test_well_formed_files_keep_their_pts_exactly(
    media: Path, caplog: pytest.LogCaptureFixture, name: str, make: Callable[[Path], Path]
) -> None:
    path = make(media / name)
    frames, plain, _ = check_repair(path, caplog)
    assert [f.meta.pts for f in frames] == plain.pts
    assert all(f.meta.source_pts is None for f in frames)


def test_h264_mp4_really_has_b_frames(media: Path) -> None:
    # What makes the test above a test of B-frames: packets stored out of presentation order.
    path = make_clip(media / "b_frames_check.mp4", frames=30)
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    assert any(p.pts != p.dts for p in packets)


def test_live_sources_decide_without_lookahead(
    media: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A camera's frames cannot wait for the look-ahead. A file opened as a "webcam" stands
    # in for one: its frames must match the repairer without look-ahead, not with it.
    path = make_pts_as_dts_mp4(media / "live.mp4", frames=30)
    plain = plain_decode(path)
    frames, _, _ = check_repair(path, caplog, kind="webcam")
    for lookahead, expected in ((0, True), (TIMESTAMP_LOOKAHEAD, False)):
        out, _ = repair(
            plain.pts,
            plain.dts,
            durations=plain.durations,
            frame_duration=512,
            discontinuity_ticks=12800,
            lookahead=lookahead,
        )
        assert ([r.pts for r in out] == [f.meta.pts for f in frames]) is expected


def test_max_frames_with_lookahead(media: Path) -> None:
    path = make_pts_as_dts_mp4(media / "budget.mp4", frames=30)
    with VideoSource(parse_source(path), max_frames=5) as source:
        frames = list(source)
        assert list(source) == []
    assert len(frames) == 5 == source.frames_decoded
    assert [f.meta.pts for f in frames] == plain_decode(path).dts[:5]


@pytest.mark.parametrize("stop_after", [3, 25])  # while decoding, and in the held-back tail
def test_stopping_early_and_iterating_again_loses_no_frame(media: Path, stop_after: int) -> None:
    path = make_pts_as_dts_mp4(media / "resume.mp4", frames=30)
    with VideoSource(parse_source(path)) as source:
        whole = [(f.meta.frame_index, f.meta.pts) for f in source]
    with VideoSource(parse_source(path)) as source:
        first = [(f.meta.frame_index, f.meta.pts) for f in itertools.islice(source, stop_after)]
        rest = [(f.meta.frame_index, f.meta.pts) for f in source]
    assert len(first) == stop_after
    assert first + rest == whole


# -- OpenCV's samples ----------------------------------------------------------------------


def opencv_sample(name: str) -> Path:
    path = OPENCV_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not installed (Debian/Ubuntu package opencv-doc)")
    return path


@pytest.mark.parametrize("name", ["Megamind.avi", "Megamind_bugy.avi"])
def test_megamind_gets_its_dts_timeline(name: str, caplog: pytest.LogCaptureFixture) -> None:
    path = opencv_sample(name)
    plain = plain_decode(path)
    assert plain.pts[:6] == [1, 2, 3, 5, 4, 6]
    frames, plain, report = check_repair(path, caplog)
    assert [f.meta.pts for f in frames] == list(range(1, 271))
    check_is_the_dts(frames, plain)
    assert (frames[3].meta.pts, frames[3].meta.source_pts) == (4, 5)
    assert report["first_frame"] == 3
    assert report["methods"] == {"dts": report["repaired_frames"] - 1, "frame_rate": 1}
    message = caplog.records[-1].getMessage()
    assert message == f"{path}: timestamps repaired from frame 3: pts out of order, using dts"


@pytest.mark.parametrize("name", ["tree.avi", "vtest.avi"])
def test_opencv_samples_with_good_timestamps_are_untouched(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    frames, plain, report = check_repair(opencv_sample(name), caplog)
    assert [f.meta.pts for f in frames] == plain.pts
    if name == "tree.avi":
        assert plain.pts[:5] == [0, 11, 17, 24, 31]
    assert report == NO_REPAIR


# -- through the decoder node and the wire ---------------------------------------------------


def test_decoder_node_hands_on_a_change_of_frame_size(media: Path) -> None:
    path = make_concatenated_ts(media / "node.ts", sizes=((160, 120), (128, 96)), frames=30)
    node = DecoderNode(DecoderConfig(source=str(path)))
    node.setup()
    frames = [m for m in node.produce() if isinstance(m, FrameMessage)]
    assert [m.image.shape for m in frames] == [(120, 160, 3)] * 30 + [(96, 128, 3)] * 30
    assert strictly_increasing([m.meta.pts for m in frames])
    assert node.detail["timestamps"]["methods"] == {"discontinuity": 30}


def test_decoder_node_carries_source_pts_and_the_report(media: Path) -> None:
    path = make_pts_as_dts_mp4(media / "node.mp4", frames=20)
    node = DecoderNode(DecoderConfig(source=str(path)))
    node.setup()
    messages = list(node.produce())
    frames = [m for m in messages if isinstance(m, FrameMessage)]
    assert len(frames) == 20
    plain = plain_decode(path)
    assert strictly_increasing([m.meta.pts for m in frames])
    assert [m.meta.source_pts for m in frames] == [
        p if p != m.meta.pts else None for m, p in zip(frames, plain.pts, strict=True)
    ]
    report = node.detail["timestamps"]
    assert report["repaired_frames"] == node.counters["timestamps_repaired"] > 0
    assert report["repaired_frames"] == sum(m.meta.source_pts is not None for m in frames)

    repaired = next(m for m in frames if m.meta.source_pts is not None)
    again = FrameMessage.from_frames(repaired.to_frames())
    assert again.meta == repaired.meta


def test_frame_meta_source_pts_on_the_wire() -> None:
    image = np.zeros((1, 1, 3), np.uint8)
    plain = FrameMeta("cam0", 3, 3, 4, (125, 2997), 1.5)

    def header(meta: FrameMeta) -> dict:
        return json.loads(FrameMessage(meta, image).to_frames()[0])

    def parsed(fields: dict) -> FrameMeta:  # a frame header whose meta holds these fields
        parts = [json.dumps({**header(plain), "meta": fields}).encode(), image.tobytes()]
        return decode(parts).meta

    meta = FrameMeta("cam0", 3, 3, 4, (125, 2997), 1.5, source_pts=5)
    assert header(meta)["meta"]["source_pts"] == 5
    assert parsed(header(meta)["meta"]) == meta
    # Not repaired: no field, as headers from before the repair existed, which still parse.
    assert "source_pts" not in header(plain)["meta"]
    assert parsed(header(plain)["meta"]).source_pts is None
    assert parsed({**header(plain)["meta"], "source_pts": None}) == plain
    with pytest.raises(
        MessageError, match=r"Expected `int \| null`, got `str` - at `\$.meta.source_pts`"
    ):
        parsed({**header(plain)["meta"], "source_pts": "5"})
    with pytest.raises(
        MessageError, match=r"Expected `int \| null`, got `bool` - at `\$.meta.source_pts`"
    ):
        parsed({**header(plain)["meta"], "source_pts": True})
