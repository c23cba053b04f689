"""MaskWriter, its sinks and the mask encodings, checked by reading every output back."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from support.masks import mask_box
from support.media import clip_box, make_clip

from pipeline.outputs.drawing import PALETTE
from pipeline.outputs.files import decode_rle, encode_rle, id_mask, read_id_mask, remove_unfinished
from pipeline.outputs.writer import MaskWriter
from pipeline.video.sources import DecodedFrame, VideoSource, parse_source
from pipeline.wire.messages import FrameMeta, MaskMessage, TrackRecord, TrackState

pytestmark = pytest.mark.timeout(60)

FINAL_NAMES = {"masks.jsonl", "tracks.txt", "overlay.mp4"}

# What run_writer returns: decoded input frames, MaskWriter.commit()'s result, and the output
# directory's listing after each write.
Written = tuple[list["DecodedFrame"], dict[str, Path], list[list[str]]]


def Track(
    track_id: int, box: tuple[float, float, float, float], score: float, state: str
) -> TrackRecord:
    """A track's record as the tracker sends it (how it got there is not the writer's)."""
    return TrackRecord(track_id, box, score, TrackState(state), 0, 0.0)


def mask_message(
    *,
    frame_index: int,
    seq: int,
    pts: int | None,
    time_base: tuple[int, int],
    frame_size: tuple[int, int],
    tracks: list[TrackRecord],
    masks: np.ndarray,
    image: np.ndarray | None,
    source_pts: int | None = None,
) -> MaskMessage:
    """One frame's MaskMessage, as the tracker sends it to the publisher."""
    meta = FrameMeta("cam0", seq, frame_index, pts, time_base, 0.0, source_pts=source_pts)
    return MaskMessage(
        meta=meta, frame_size=frame_size, tracks=tuple(tracks), masks=masks, image=image
    )


# -- encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (5, 7), (121, 161)])
def test_rle_round_trip_random_masks(size: tuple[int, int]) -> None:
    mask = np.random.default_rng(sum(size)).random(size) > 0.6
    rle = encode_rle(mask)
    assert rle["size"] == list(size)
    assert isinstance(rle["counts"], str)
    rle = json.loads(json.dumps(rle))  # what a reader of masks.jsonl gets
    decoded = decode_rle(rle)
    assert decoded.dtype == bool and decoded.shape == size
    np.testing.assert_array_equal(decoded, mask)
    # COCO's own decoder agrees, so other tools read the same mask.
    coco = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(coco.astype(bool), mask)


@pytest.mark.parametrize("fill", [False, True])
def test_rle_round_trip_empty_and_full(fill: bool) -> None:
    mask = np.full((13, 9), fill)
    np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)


def test_rle_rejects_float_and_wrong_rank() -> None:
    with pytest.raises(ValueError, match="bool or integer"):
        encode_rle(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\) array, got shape \(1, 4, 4\)"):
        encode_rle(np.zeros((1, 4, 4), dtype=bool))


def test_mask_box_is_exclusive() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    assert mask_box(mask) is None
    mask[5:9, 10:17] = True
    assert mask_box(mask) == (10.0, 5.0, 17.0, 9.0)
    single = np.zeros((3, 3), dtype=np.uint8)
    single[2, 0] = 1
    assert mask_box(single) == (0.0, 2.0, 1.0, 3.0)


def test_id_mask_later_tracks_win_and_ids_are_checked() -> None:
    masks = np.zeros((2, 6, 8), dtype=bool)
    masks[0, 1:4, 1:5] = True
    masks[1, 2:5, 3:7] = True
    painted = id_mask(masks, [3, 200], (6, 8))
    assert painted.dtype == np.uint8 and painted.shape == (6, 8)
    assert painted[1, 1] == 3 and painted[2, 3] == 200 and painted[4, 6] == 200
    assert painted[0, 0] == 0
    assert id_mask(np.zeros((0, 6, 8), bool), [], (6, 8)).sum() == 0
    for bad in (0, 65536):
        with pytest.raises(ValueError, match=r"1\.\.65535"):
            id_mask(masks, [1, bad], (6, 8))
    with pytest.raises(ValueError, match=r"the frame's \(H, W\)"):
        id_mask(masks, [1, 2], (8, 6))
    with pytest.raises(ValueError, match="2 masks for 1 tracks"):
        id_mask(masks, [1], (6, 8))


def test_palette() -> None:
    assert len(PALETTE) == 768 and all(0 <= v <= 255 for v in PALETTE)
    colours = [tuple(PALETTE[i : i + 3]) for i in range(0, 768, 3)]
    assert colours[0] == (0, 0, 0)
    assert colours[1] == (128, 0, 0) and colours[2] == (0, 128, 0)  # DAVIS' first objects
    assert len(set(colours)) == 256


# -- a full run ---------------------------------------------------------------------------


def rect_mask(box: tuple[int, int, int, int], frame_size: tuple[int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros(frame_size, dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def frame_tracks(frame: DecodedFrame, frames: int) -> tuple[list[Track], np.ndarray]:
    """Three tracks: the moving box, a fixed square overlapping its path, and a lost one."""
    height, width = frame.image.shape[:2]
    moving = clip_box(frame.meta.frame_index, frames=frames, size=(width, height))
    fixed = (60, 40, 90, 70)
    tracks = [
        Track(1, tuple(map(float, moving)), 0.9, "tracked"),  # type: ignore[arg-type]
        Track(
            7,
            tuple(map(float, fixed)),
            0.5,
            "coasting" if frame.meta.frame_index % 2 else "tentative",
        ),  # type: ignore[arg-type]
        Track(12, (1.0, 2.0, 3.0, 4.0), 0.1, "lost"),
    ]
    masks = np.stack(
        [
            rect_mask(moving, (height, width)),
            rect_mask(fixed, (height, width)),
            np.zeros((height, width), dtype=bool),
        ]
    )
    return tracks, masks


def run_writer(clip: Path, out_dir: Path, **writer_args: object) -> Written:
    """Decode ``clip``, write every frame, and list the output directory after each write."""
    with VideoSource(parse_source(clip)) as source:
        frames = list(source)
    listings = []
    with MaskWriter(out_dir, **writer_args) as writer:  # type: ignore[arg-type]
        for frame in frames:
            tracks, masks = frame_tracks(frame, len(frames))
            writer.write(
                mask_message(
                    frame_index=frame.meta.frame_index,
                    seq=100 + frame.meta.frame_index,
                    pts=frame.meta.pts,
                    time_base=frame.meta.time_base,
                    frame_size=frame.image.shape[:2],
                    tracks=tracks,
                    masks=masks,
                    image=frame.image,
                )
            )
            listings.append(sorted(os.listdir(out_dir)))
            if "masks" in writer.sinks:  # each PNG is in place, complete, as soon as it is written
                pngs = sorted(os.listdir(out_dir / "masks"))
                assert pngs == [f"{i:06d}.png" for i in range(frame.meta.frame_index + 1)]
    result = writer.commit()  # a second commit returns the same outputs
    return frames, result, listings


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    root = tmp_path_factory.mktemp("run")
    clip = make_clip(root / "in.mp4", frames=30, size=(160, 120))
    return run_writer(clip, root / "out")


def test_nothing_under_final_names_until_commit(written: Written) -> None:
    _, result, listings = written
    for listing in listings:
        assert not FINAL_NAMES & set(listing)
        assert all(name == "masks" or name.startswith(".") for name in listing)
    out_dir = result["jsonl"].parent
    assert sorted(os.listdir(out_dir)) == ["masks", "masks.jsonl", "overlay.mp4", "tracks.txt"]
    assert result == {
        "jsonl": out_dir / "masks.jsonl",
        "mot": out_dir / "tracks.txt",
        "overlay": out_dir / "overlay.mp4",
        "masks": out_dir / "masks",
    }


def test_pngs_are_palette_id_masks(written: Written) -> None:
    frames, result, _ = written
    pngs = sorted(result["masks"].iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(len(frames))]
    for frame, png in zip(frames, pngs, strict=True):
        tracks, masks = frame_tracks(frame, len(frames))
        with Image.open(png) as image:
            assert image.mode == "P"
            assert image.getpalette()[:9] == PALETTE[:9]
            values = np.array(image)
        np.testing.assert_array_equal(
            values, id_mask(masks, [t.track_id for t in tracks], values.shape)
        )


def test_jsonl_decodes_to_the_png_masks(written: Written) -> None:
    frames, result, _ = written
    lines = result["jsonl"].read_text().splitlines()
    assert len(lines) == len(frames)
    for frame, line in zip(frames, lines, strict=True):
        record = json.loads(line)
        assert (
            record["frame"] == frame.meta.frame_index
            and record["seq"] == 100 + frame.meta.frame_index
        )
        assert record["pts"] == frame.meta.pts
        assert record["time"] == pytest.approx(
            frame.meta.pts * frame.meta.time_base[0] / frame.meta.time_base[1]
        )
        assert [t["id"] for t in record["tracks"]] == [1, 7, 12]
        assert record["tracks"][0]["state"] == "tracked" and record["tracks"][0]["score"] == 0.9
        with Image.open(result["masks"] / f"{frame.meta.frame_index:06d}.png") as image:
            png = np.array(image)
        for track in record["tracks"]:
            mask = decode_rle(track["rle"])
            # Painted in order, so each mask equals its id's pixels where no later track covers.
            later = [decode_rle(t["rle"]) for t in record["tracks"] if t["id"] > track["id"]]
            covered = np.any(later, axis=0) if later else np.zeros_like(mask)
            np.testing.assert_array_equal(mask & ~covered, png == track["id"])
        assert record["tracks"][0]["box"] == list(
            map(float, clip_box(frame.meta.frame_index, frames=len(frames), size=(160, 120)))
        )


def test_mot_lines(written: Written) -> None:
    frames, result, _ = written
    lines = result["mot"].read_text().splitlines()
    assert len(lines) == 2 * len(frames)  # the lost track is left out
    first = lines[0].split(",")
    x1, y1, x2, y2 = clip_box(0, frames=len(frames), size=(160, 120))
    assert first[:2] == ["1", "1"]
    assert [float(v) for v in first[2:7]] == [x1, y1, x2 - x1, y2 - y1, 0.9]
    assert first[7:] == ["-1", "-1", "-1"]
    assert lines[1].split(",")[:7] == ["1", "7", "60.00", "40.00", "30.00", "30.00", "0.5000"]
    frame_numbers = [int(line.split(",")[0]) for line in lines]
    assert frame_numbers == [i // 2 + 1 for i in range(2 * len(frames))]


def test_overlay_has_same_frames_and_timestamps(written: Written) -> None:
    frames, result, _ = written
    with av.open(str(result["overlay"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.time_base == Fraction(*frames[0].meta.time_base)
        decoded = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    assert [pts for pts, _ in decoded] == [f.meta.pts for f in frames]
    image = decoded[0][1]
    assert image.shape == (120, 160, 3)
    # In frame 0 the fixed square (id 7) is clear of the moving box and tinted half-way to
    # its palette colour; far from every mask the frame is the input (up to H.264 loss).
    colour = np.array(PALETTE[21:24], dtype=float)
    tinted = image[50:60, 70:80].reshape(-1, 3).mean(axis=0)
    original = frames[0].image[50:60, 70:80].reshape(-1, 3).mean(axis=0)
    assert np.abs(tinted - (original + colour) / 2).max() < 20
    assert np.abs(image[100:, :20].astype(int) - frames[0].image[100:, :20]).mean() < 10


def test_variable_frame_rate_and_odd_size_overlay(tmp_path: Path) -> None:
    pts_ms = [0, 40, 80, 200, 210, 220, 400, 440, 1000, 1033]
    clip = make_clip(
        tmp_path / "vfr.mkv",
        frames=10,
        size=(161, 121),
        pix_fmt="yuv444p",  # libx264 cannot store odd sizes in 4:2:0
        pts=pts_ms,
        time_base=Fraction(1, 1000),
    )
    frames, result, _ = run_writer(clip, tmp_path / "out", write_png=False)
    assert "masks" not in result and not (tmp_path / "out" / "masks").exists()
    with av.open(str(result["overlay"])) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (162, 122)  # padded by one pixel to be even
        assert [f.pts for f in container.decode(stream)] == pts_ms
    assert len(frames) == 10


# -- failures -----------------------------------------------------------------------------


def write_blank(writer: MaskWriter, index: int, **overrides: object) -> None:
    args: dict[str, object] = {
        "frame_index": index,
        "seq": index,
        "pts": index,
        "time_base": (1, 25),
        "frame_size": (24, 32),
        "tracks": [Track(1, (0.0, 0.0, 4.0, 4.0), 1.0, "tracked")],
        "masks": np.ones((1, 24, 32), dtype=bool),
        "image": np.zeros((24, 32, 3), dtype=np.uint8),
    }
    args.update(overrides)
    writer.write(mask_message(**args))  # type: ignore[arg-type]


def test_discard_leaves_no_files(tmp_path: Path) -> None:
    writer = MaskWriter(tmp_path)
    for i in range(3):
        write_blank(writer, i)
    assert (tmp_path / "masks" / "000002.png").exists()
    writer.discard()
    assert os.listdir(tmp_path) == []
    writer.discard()  # idempotent
    with pytest.raises(RuntimeError, match="discarded"):
        writer.commit()


def test_exception_in_context_discards(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), MaskWriter(tmp_path) as writer:
        write_blank(writer, 0)
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_overlay_needs_an_image_and_bad_frames_write_nothing(tmp_path: Path) -> None:
    """Every sink checks a frame before any writes it: a frame one of them refuses leaves
    no line in the others' files either."""
    with MaskWriter(tmp_path) as writer:
        write_blank(writer, 0)
        with pytest.raises(ValueError, match="needs the frame's image"):
            write_blank(writer, 1, image=None)
        with pytest.raises(ValueError, match=r"ids must be 1\.\.65535"):  # the PNG's refusal
            write_blank(writer, 1, tracks=[Track(70000, (0.0, 0.0, 4.0, 4.0), 1.0, "tracked")])
        with pytest.raises(ValueError, match="time_base must be two positive ints"):
            write_blank(writer, 1, time_base=(0, 25))
        with pytest.raises(ValueError, match="bad frame_index -1"):
            write_blank(writer, -1)
        # Masks of another size than the frame's: the message itself refuses them.
        with pytest.raises(ValueError, match=r"the frame's \(H, W\)"):
            write_blank(writer, 1, frame_size=(32, 24))
        write_blank(writer, 1)
    assert len((tmp_path / "masks.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "tracks.txt").read_text().splitlines()) == 2
    assert sorted(os.listdir(tmp_path / "masks")) == ["000000.png", "000001.png"]
    with av.open(str(tmp_path / "overlay.mp4")) as container:
        assert len(list(container.decode(video=0))) == 2
    with pytest.raises(RuntimeError, match="committed; create a new one"):
        write_blank(writer, 2)


def test_a_killed_writer_leaves_only_temporaries_that_remove_unfinished_clears(
    tmp_path: Path,
) -> None:
    with MaskWriter(tmp_path) as writer:  # an earlier, complete run
        write_blank(writer, 0)
    before = {name: (tmp_path / name).read_bytes() for name in FINAL_NAMES}
    writer = MaskWriter(tmp_path)  # killed after two frames: never committed nor discarded
    write_blank(writer, 0)
    write_blank(writer, 1)
    writer.sinks["overlay"].finish()  # FFmpeg's file handle, as a killed process closes it
    temporaries = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert [name.split(".")[1] for name in temporaries] == ["masks", "overlay", "tracks"]
    removed = remove_unfinished(tmp_path)
    assert sorted(p.name for p in removed) == temporaries
    assert {name: (tmp_path / name).read_bytes() for name in FINAL_NAMES} == before
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert remove_unfinished(tmp_path) == []


def test_overlay_never_fails_on_a_repeated_timestamp(tmp_path: Path) -> None:
    """The decoder repairs timestamps; should one still repeat, the overlay moves it one
    tick on (a muxer refuses equal timestamps) instead of ending the run."""
    with MaskWriter(tmp_path) as writer:
        write_blank(writer, 0, pts=0)
        write_blank(writer, 1, pts=0)
        write_blank(writer, 2, pts=5)
        assert writer.sinks["overlay"].retimed_frames == 1  # type: ignore[attr-defined]
    with av.open(str(tmp_path / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        pts = [f.pts for f in container.decode(stream)]
    assert len(pts) == 3 and pts == sorted(set(pts))


def test_overlay_keeps_its_size_when_frames_change_size(tmp_path: Path) -> None:
    with MaskWriter(tmp_path) as writer:
        write_blank(writer, 0)
        write_blank(
            writer,
            1,
            frame_size=(48, 64),
            masks=np.ones((1, 48, 64), dtype=bool),
            image=np.zeros((48, 64, 3), dtype=np.uint8),
        )
        assert writer.sinks["overlay"].rescaled_frames == 1  # type: ignore[attr-defined]
    with av.open(str(tmp_path / "overlay.mp4")) as container:
        sizes = [(f.height, f.width) for f in container.decode(video=0)]
    first = np.asarray(Image.open(tmp_path / "masks" / "000000.png")).shape
    assert sizes == [first, first]
    assert np.asarray(Image.open(tmp_path / "masks" / "000001.png")).shape == (48, 64)


def test_outputs_get_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with MaskWriter(tmp_path) as writer:
            write_blank(writer, 0)
    finally:
        os.umask(old)
    for path in [
        tmp_path / "masks.jsonl",
        tmp_path / "tracks.txt",
        tmp_path / "overlay.mp4",
        tmp_path / "masks" / "000000.png",
    ]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_frames_without_pts_use_overlay_fps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overlay_fps"), MaskWriter(tmp_path / "a") as writer:
        write_blank(writer, 0, pts=None)
    with MaskWriter(tmp_path / "b", overlay_fps=Fraction(30000, 1001)) as writer:
        for i in range(5):
            write_blank(writer, i, pts=None)
    with av.open(str(tmp_path / "b" / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        seconds = [f.pts * stream.time_base for f in container.decode(stream)]
    assert seconds == [Fraction(1001 * i, 30000) for i in range(5)]
    record = json.loads((tmp_path / "b" / "masks.jsonl").read_text().splitlines()[0])
    assert record["pts"] is None and record["time"] is None


def _moving_frames(count: int) -> list[dict[str, object]]:
    frames = []
    for i in range(count):
        masks = np.zeros((2, 24, 32), dtype=bool)
        masks[0, 2:10, i : i + 6] = True
        masks[1, 14:20, 20:30] = True
        image = np.full((24, 32, 3), 10 * i, dtype=np.uint8)
        tracks = [
            Track(1, (float(i), 2.0, float(i + 6), 10.0), 0.9, "tracked"),
            Track(2, (20.0, 14.0, 30.0, 20.0), 0.8, "coasting"),
        ]
        frames.append(
            {
                "frame_index": i,
                "seq": i,
                "pts": 2 * i,
                "time_base": (1, 50),
                "frame_size": (24, 32),
                "tracks": tracks,
                "masks": masks,
                "image": image,
            }
        )
    return frames


def test_resumed_outputs_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    frames = _moving_frames(10)
    with MaskWriter(tmp_path / "full") as writer:
        for frame in frames:
            writer.write(mask_message(**frame))  # type: ignore[arg-type]
    # An interrupted run: frames 0..3 complete, then closed (as the publisher does on stop).
    with MaskWriter(tmp_path / "resumed") as writer:
        for frame in frames[:4]:
            writer.write(mask_message(**frame))  # type: ignore[arg-type]
    with MaskWriter(tmp_path / "resumed", resume_frames=4) as writer:
        with pytest.raises(ValueError, match="before frame 4"):
            writer.write(mask_message(**frames[3]))  # type: ignore[arg-type]
        for frame in frames[4:]:
            writer.write(mask_message(**frame))  # type: ignore[arg-type]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for name in ("masks.jsonl", "tracks.txt"):
        assert (resumed / name).read_bytes() == (full / name).read_bytes(), name
    for i in range(10):
        name = f"masks/{i:06d}.png"
        assert (resumed / name).read_bytes() == (full / name).read_bytes(), name
    timings = []
    for out in (full, resumed):
        with av.open(str(out / "overlay.mp4")) as container:
            stream = container.streams.video[0]
            timings.append([f.pts * stream.time_base for f in container.decode(stream)])
    assert timings[0] == timings[1] == [Fraction(2 * i, 50) for i in range(10)]
    assert not [p for p in os.listdir(resumed) if p.endswith(".tmp")]


def test_resume_needs_a_complete_prefix(tmp_path: Path) -> None:
    frames = _moving_frames(3)
    with MaskWriter(tmp_path) as writer:
        for frame in frames:
            writer.write(mask_message(**frame))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"masks\.jsonl has only 3 frames"):
        MaskWriter(tmp_path, resume_frames=5)
    (tmp_path / "masks" / "000001.png").unlink()
    with pytest.raises(ValueError, match=r"masks/000001\.png is missing"):
        MaskWriter(tmp_path, resume_frames=3)
    assert (tmp_path / "masks.jsonl").read_text().count("\n") == 3  # nothing was changed


# -- ids above 255: 16-bit PNGs -------------------------------------------------------------


def _many_tracks_frame(index: int, ids: list[int]) -> dict[str, object]:
    """One frame of len(ids) little square objects on a 40x64 grid, each its own 4x4 cell."""
    height, width = 4 * 10, 4 * 64
    masks = np.zeros((len(ids), height, width), dtype=bool)
    tracks = []
    for row, track_id in enumerate(ids):
        y, x = divmod(row, 64)
        masks[row, 4 * y : 4 * y + 3, 4 * x : 4 * x + 3] = True
        box = (4.0 * x, 4.0 * y, 4.0 * x + 3, 4.0 * y + 3)
        tracks.append(Track(track_id, box, 0.9, "tracked"))
    return {
        "frame_index": index,
        "seq": index,
        "pts": index,
        "time_base": (1, 25),
        "frame_size": (height, width),
        "tracks": tracks,
        "masks": masks,
        "image": np.full((height, width, 3), 40, dtype=np.uint8),
    }


def test_id_mask_is_8_bit_up_to_255_and_16_bit_past_it() -> None:
    masks = np.zeros((2, 6, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 3:5, 4:7] = True
    assert id_mask(masks, [1, 255], (6, 8)).dtype == np.uint8
    wide = id_mask(masks, [1, 256], (6, 8))
    assert wide.dtype == np.uint16
    assert wide[1, 1] == 1 and wide[3, 4] == 256 and wide[0, 0] == 0
    assert id_mask(masks, [65535, 300], (6, 8))[1, 1] == 65535


def test_16_bit_pngs_hold_ids_past_255_exactly(tmp_path: Path) -> None:
    """A frame whose ids are all <= 255 stays an 8-bit palette PNG; one with a larger id is a
    16-bit PNG that every usual reader gives back exactly."""
    import cv2

    small = _many_tracks_frame(0, list(range(1, 201)))
    large = _many_tracks_frame(1, [*range(1, 300), 40000, 65535])
    with MaskWriter(tmp_path, write_overlay=True) as writer:
        writer.write(mask_message(**small))  # type: ignore[arg-type]
        writer.write(mask_message(**large))  # type: ignore[arg-type]
    png0, png1 = tmp_path / "masks" / "000000.png", tmp_path / "masks" / "000001.png"
    assert Image.open(png0).mode == "P"
    expected0 = id_mask(small["masks"], list(range(1, 201)), (40, 256))  # type: ignore[arg-type]
    assert np.array_equal(read_id_mask(png0), expected0)
    ids1 = [t.track_id for t in large["tracks"]]  # type: ignore[attr-defined]
    expected1 = id_mask(large["masks"], ids1, (40, 256))  # type: ignore[arg-type]
    assert expected1.dtype == np.uint16 and expected1.max() == 65535
    for ids in (
        read_id_mask(png1),
        cv2.imread(str(png1), cv2.IMREAD_UNCHANGED),
        np.asarray(Image.open(png1)),
    ):
        assert ids.dtype == np.uint16 and np.array_equal(ids, expected1)
    # The JSON lines say the same as the 16-bit PNG, track by track.
    line = json.loads((tmp_path / "masks.jsonl").read_text().splitlines()[1])
    assert [t["id"] for t in line["tracks"]] == ids1
    for track in line["tracks"]:
        assert np.array_equal(decode_rle(track["rle"]), expected1 == track["id"])
    assert "40000," in (tmp_path / "tracks.txt").read_text()  # MOT keeps the id too


def test_resume_across_16_bit_pngs(tmp_path: Path) -> None:
    """An interrupted run whose PNGs are 16-bit resumes as an uninterrupted one writes."""
    ids = [*range(1, 260), 1000]
    frames = [_many_tracks_frame(i, ids) for i in range(4)]
    with MaskWriter(tmp_path / "full") as writer:
        for frame in frames:
            writer.write(mask_message(**frame))  # type: ignore[arg-type]
    with MaskWriter(tmp_path / "resumed") as writer:
        for frame in frames[:2]:
            writer.write(mask_message(**frame))  # type: ignore[arg-type]
    with MaskWriter(tmp_path / "resumed", resume_frames=2) as writer:
        for frame in frames[2:]:
            writer.write(mask_message(**frame))  # type: ignore[arg-type]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for name in ("masks.jsonl", "tracks.txt"):
        assert (resumed / name).read_bytes() == (full / name).read_bytes(), name
    for i in range(4):
        name = f"masks/{i:06d}.png"
        assert (resumed / name).read_bytes() == (full / name).read_bytes(), name
        assert read_id_mask(resumed / name).max() == 1000
