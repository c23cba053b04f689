"""VideoSource and parse_source against real files encoded by PyAV in tmp_path."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from support.media import BOX_COLOUR, clip_box, damage_packets, make_clip

from pipeline.video.sources import DecodedFrame, SourceError, SourceSpec, VideoSource, parse_source

pytestmark = pytest.mark.timeout(60)

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def read_all(path: Path, **kwargs: object) -> tuple[VideoSource, list[DecodedFrame], int | None]:
    """Decode ``path`` fully; also return the frame count hint it gave before decoding."""
    with VideoSource(parse_source(str(path)), **kwargs) as source:
        hint = source.frame_count_hint
        frames = list(source)
    return source, frames, hint


def pyav_pts(path: Path) -> tuple[list[int | None], Fraction]:
    """What PyAV itself reports for the file, decoded without VideoSource."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts for frame in container.decode(stream)], stream.time_base


def strictly_increasing(values: Sequence[float]) -> bool:
    return all(b > a for a, b in itertools.pairwise(values))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=30, size=(160, 120))


# -- parse_source ---------------------------------------------------------------------------


def test_parse_lavfi_sources() -> None:
    spec = parse_source("lavfi:testsrc2=size=320x240:rate=25")
    assert spec == SourceSpec(url="testsrc2=size=320x240:rate=25", kind="lavfi", format="lavfi")
    assert parse_source("testsrc2=size=320x240").url == "testsrc2=size=320x240"
    assert parse_source("testsrc:size=64x48").url == "testsrc=size=64x48"
    assert parse_source("testsrc").kind == "lavfi"
    with pytest.raises(SourceError, match="empty filter graph"):
        parse_source("lavfi:")


def test_parse_rtsp_defaults_to_tcp_and_options_override() -> None:
    spec = parse_source("rtsp://camera.local:554/stream1")
    assert (spec.kind, spec.format, spec.options) == ("rtsp", None, {"rtsp_transport": "tcp"})
    assert parse_source("RTSPS://cam/x").kind == "rtsp"
    spec = parse_source("rtsp://cam/x", options={"rtsp_transport": "udp", "timeout": "5000000"})
    assert spec.options == {"rtsp_transport": "udp", "timeout": "5000000"}


def test_parse_webcam() -> None:
    assert parse_source("0") == SourceSpec(url="/dev/video0", kind="webcam", format="v4l2")
    assert parse_source("/dev/video3").url == "/dev/video3"
    spec = parse_source("2", options={"video_size": "640x480"})
    assert (spec.url, spec.options) == ("/dev/video2", {"video_size": "640x480"})


def test_parse_file(clip: Path, tmp_path: Path) -> None:
    assert parse_source(clip) == SourceSpec(url=str(clip), kind="file")
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match=r"nope\.mp4.*does not exist"):
        parse_source(str(missing))
    with pytest.raises(SourceError, match="empty"):
        parse_source("  ")


# -- reading good sources --------------------------------------------------------------------


def test_reads_every_frame_with_pyav_pts(clip: Path) -> None:
    source, frames, _ = read_all(clip)
    expected_pts, time_base = pyav_pts(clip)

    assert len(frames) == 30 == source.frames_decoded
    assert source.corrupt_packets == 0
    assert [f.meta.frame_index for f in frames] == list(range(30))
    assert [f.meta.pts for f in frames] == expected_pts
    assert strictly_increasing(expected_pts)  # type: ignore[arg-type]
    assert all(f.meta.source_pts is None for f in frames)  # well-formed: nothing repaired
    assert source.timestamp_report == {"repaired_frames": 0, "first_frame": None, "methods": {}}
    assert {f.meta.time_base for f in frames} == {(time_base.numerator, time_base.denominator)}
    for frame in frames:
        assert frame.image.shape == (120, 160, 3)
        assert frame.image.dtype == np.uint8
        assert frame.image.flags.c_contiguous
    assert all(b.meta.capture_time >= a.meta.capture_time for a, b in itertools.pairwise(frames))


def test_frames_are_rgb_with_the_box_where_it_was_drawn(clip: Path) -> None:
    _, frames, _ = read_all(clip)
    for frame in (frames[0], frames[-1]):
        x1, y1, x2, y2 = clip_box(frame.meta.frame_index, frames=30, size=(160, 120))
        inner = frame.image[y1 + 3 : y2 - 3, x1 + 3 : x2 - 3].reshape(-1, 3).mean(axis=0)
        # Lossy coding moves colours a little; channel order (RGB, not BGR) must hold exactly.
        np.testing.assert_allclose(inner, BOX_COLOUR, atol=12)


def test_stream_facts_after_open(clip: Path) -> None:
    source = VideoSource(parse_source(clip))
    with pytest.raises(RuntimeError, match="not open"):
        _ = source.width
    with source:
        assert (source.width, source.height) == (160, 120)
        assert source.average_rate == 25
        assert source.frame_count_hint == 30
    source.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        list(source)


def test_max_frames_is_honoured(clip: Path) -> None:
    with VideoSource(parse_source(clip), max_frames=7) as source:
        assert source.frame_count_hint == 7
        frames = list(source)
        assert list(source) == []  # the budget is spent, not restarted
    assert [f.meta.frame_index for f in frames] == list(range(7))
    assert source.frames_decoded == 7


@pytest.mark.parametrize("suffix", [".mkv", ".ts"])
def test_other_containers_keep_their_pts(tmp_path: Path, suffix: str) -> None:
    path = make_clip(tmp_path / f"clip{suffix}", frames=20)
    _, frames, hint = read_all(path)
    assert len(frames) == 20
    assert hint == 20  # estimated from the duration: no frame count stored
    assert [f.meta.pts for f in frames] == pyav_pts(path)[0]


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_variable_frame_rate_keeps_timestamps(tmp_path: Path, suffix: str) -> None:
    pts_ms = [0, 40, 80, 200, 210, 220, 400, 440, 1000, 1033]
    path = make_clip(tmp_path / f"vfr{suffix}", frames=10, pts=pts_ms, time_base=Fraction(1, 1000))
    _, frames, _ = read_all(path)
    seconds = [f.meta.pts * Fraction(*f.meta.time_base) for f in frames]  # type: ignore[operator]
    assert seconds == [Fraction(p, 1000) for p in pts_ms]
    if suffix == ".mkv":  # Matroska stores milliseconds, so the numbers themselves survive
        assert [f.meta.pts for f in frames] == pts_ms


def test_lavfi_test_source(tmp_path: Path) -> None:
    with VideoSource(parse_source("lavfi:testsrc2=size=320x240:rate=25"), max_frames=5) as src:
        assert src.frame_count_hint == 5
        frames = list(src)
    assert len(frames) == 5
    assert [f.meta.pts for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].meta.time_base == (1, 25)
    assert frames[0].image.shape == (240, 320, 3)


@pytest.mark.skipif(not (OPENCV_DATA / "vtest.avi").exists(), reason="opencv-doc not installed")
def test_opencv_sample_decodes_fully() -> None:
    source, frames, hint = read_all(OPENCV_DATA / "vtest.avi")
    assert len(frames) == 795 == hint
    assert frames[0].image.shape == (576, 768, 3)
    assert source.corrupt_packets == 0


# -- bad sources: each a SourceError naming the file and the problem --------------------------


def open_file(path: Path) -> None:
    with VideoSource(SourceSpec(url=str(path), kind="file")) as source:
        list(source)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"gone\.mp4.*does not exist"):
        open_file(tmp_path / "gone.mp4")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.mp4"
    path.touch()
    with pytest.raises(SourceError, match=r"zero\.mp4.*empty \(0 bytes\)"):
        open_file(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError, match=r"garbage\.mp4.*not a video FFmpeg can read"):
        open_file(path)


def test_truncated_mp4_says_moov_missing(clip: Path, tmp_path: Path) -> None:
    data = clip.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.mp4.*moov atom not found.*truncated"):
        open_file(path)


def test_audio_only_file(tmp_path: Path) -> None:
    path = tmp_path / "speech.m4a"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(SourceError, match=r"speech\.m4a.*no video stream.*audio"):
        open_file(path)


def test_open_times_out_on_a_server_that_never_answers() -> None:
    # A camera that accepts the connection and then says nothing must not hang the open.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"rtsp://127.0.0.1:{server.getsockname()[1]}/stream"
        source = VideoSource(parse_source(url), open_timeout_s=0.5)
        with pytest.raises(SourceError, match=r"127\.0\.0\.1.*no answer within .* 0\.5 s"):
            source.open()


# -- damaged packets ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mkv", ".ts"])
def test_damaged_middle_still_decodes_most_frames(tmp_path: Path, suffix: str) -> None:
    path = make_clip(tmp_path / f"clip{suffix}", frames=60, keyframe_interval=10)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1500] = np.random.default_rng(7).bytes(1500)
    path.write_bytes(bytes(data))

    source, frames, _ = read_all(path)
    # FFmpeg conceals some damage and reports the rest as InvalidDataError, depending on the
    # container and FFmpeg version; what must hold is that the run ends normally with most
    # frames, in order, and that every skipped packet was counted rather than raised. A frame
    # whose PES header was hit comes out of FFmpeg without a timestamp: the source gives it
    # one after the frame before, so every frame has a strictly increasing pts.
    assert 30 <= len(frames) <= 60
    assert source.frames_decoded == len(frames)
    assert source.corrupt_packets < source.max_consecutive_errors
    pts = [f.meta.pts for f in frames]
    assert None not in pts
    assert strictly_increasing(pts)  # type: ignore[arg-type]


def corrupt(message: str = "Invalid data found when processing input") -> av.InvalidDataError:
    return av.error.InvalidDataError(1094995529, message)


@pytest.fixture(scope="module")
def intra_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Every frame a keyframe: losing a packet loses exactly that frame, so counts are exact.
    path = tmp_path_factory.mktemp("intra") / "intra.mkv"
    return make_clip(path, frames=30, codec="mpeg4", keyframe_interval=1)


def test_decoder_errors_are_skipped_and_counted(intra_clip: Path, tmp_path: Path) -> None:
    damaged = damage_packets(intra_clip, tmp_path / "damaged.mkv", {4, 5, 6, 19})
    source = VideoSource(parse_source(damaged))
    with source:
        frames = list(source)
    assert source.corrupt_packets == 4
    assert len(frames) == 26 == source.frames_decoded
    assert [f.meta.frame_index for f in frames] == list(range(26))
    good = [i for i in range(30) if i not in {4, 5, 6, 19}]
    with VideoSource(parse_source(intra_clip)) as clean:
        expected = [f.image for f in clean]
    assert all(np.array_equal(f.image, expected[i]) for f, i in zip(frames, good, strict=True))


def test_too_many_consecutive_errors_raise(intra_clip: Path, tmp_path: Path) -> None:
    damaged = damage_packets(intra_clip, tmp_path / "damaged.mkv", set(range(30)))
    source = VideoSource(parse_source(damaged), max_consecutive_errors=5)
    with pytest.raises(SourceError, match=r"damaged\.mkv.*5 corrupt packets in a row"), source:
        list(source)
    assert source.corrupt_packets == 5


def test_frames_decoded_before_a_fatal_error_are_handed_out_first(
    intra_clip: Path, tmp_path: Path
) -> None:
    # Files are decoded a few frames ahead (for the timestamp repair): those frames are
    # good, and must reach the caller before the error does.
    damaged = damage_packets(intra_clip, tmp_path / "damaged.mkv", set(range(12, 30)))
    source = VideoSource(parse_source(damaged), max_consecutive_errors=3)
    frames: list[DecodedFrame] = []
    with pytest.raises(SourceError, match="3 corrupt packets in a row"), source:
        frames.extend(source)
    # (Fewer than 12 at most: the decoder's threads may still hold the last good frames.)
    assert 8 < len(frames) <= 12
    assert [f.meta.frame_index for f in frames] == list(range(len(frames)))
    assert strictly_increasing([f.meta.pts for f in frames])  # type: ignore[misc]


def test_demuxer_errors_resume_after_the_bad_data(
    intra_clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = VideoSource(parse_source(intra_clip))
    real_demux, calls = source._demux, []

    def demux_failing_once() -> Iterator[av.Packet]:
        calls.append(1)
        packets = real_demux()
        if len(calls) > 1:
            return packets

        def fail_at_fourth() -> Iterator[av.Packet]:
            for i, packet in enumerate(packets):
                if i == 3:  # this packet's bytes are "unreadable": it is lost
                    raise corrupt()
                yield packet

        return fail_at_fourth()

    monkeypatch.setattr(source, "_demux", demux_failing_once)
    with source:
        frames = list(source)
    assert len(calls) == 2
    assert source.corrupt_packets == 1
    assert len(frames) == 29
