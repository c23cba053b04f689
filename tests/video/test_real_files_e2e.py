"""`samstream run` on files that look like users' files: broken timestamps, B-frames, variable
frame rate, a concatenation with a size change, opencv-doc's sample videos; every output one
segmentation; interrupting and resuming; the checks made before any node starts."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from support.e2e import collect, free_port, samstream
from support.media import make_b_frame_avi, make_clip, make_concatenated_ts, make_pts_as_dts_mp4

from pipeline.outputs.files import decode_rle
from pipeline.wire.client import MaskSubscriber

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
FAST = ["--image-size", "256"]  # the full graph, at a size a 2-core CI machine runs quickly
# Two overlapping boxes: without exclusive masks their masks would share pixels.
BOXES = [["--box", "10", "20", "70", "90"], ["--box", "40", "30", "110", "100"]]


def _flat(groups: list[list[str]]) -> list[str]:
    return [arg for group in groups for arg in group]


def decoded_frames(path: Path, limit: int | None = None) -> int:
    with av.open(str(path)) as container:
        count = sum(1 for _ in container.decode(video=0))
    return min(count, limit) if limit else count


def check_one_segmentation(out: Path, frames: int, feed: list | None = None) -> list[dict]:
    """One record per frame, strictly increasing pts and time, PNG == RLE (== the feed's
    masks), no pixel in two masks, and an overlay with as many frames."""
    records = [json.loads(line) for line in (out / "masks.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(frames))
    pts = [r["pts"] for r in records]
    times = [r["time"] for r in records]
    assert all(b > a for a, b in itertools.pairwise(pts)), pts
    assert all(b > a for a, b in itertools.pairwise(times)), times
    by_seq = {f.seq: f for f in feed or []}
    for record in records:
        ids = np.asarray(Image.open(out / "masks" / f"{record['frame']:06d}.png"))
        union = np.zeros(ids.shape, dtype=np.int32)
        for track in record["tracks"]:
            mask = decode_rle(track["rle"])
            assert mask.shape == ids.shape
            assert np.array_equal(mask, ids == track["id"]), (record["frame"], track["id"])
            union += mask
        assert union.max(initial=0) <= 1, f"frame {record['frame']}: masks overlap"
        if feed is not None:
            published = by_seq[record["seq"]]
            assert [t.track_id for t in published.tracks] == [t["id"] for t in record["tracks"]]
            for mask, track in zip(published.masks, record["tracks"], strict=True):
                assert np.array_equal(mask, decode_rle(track["rle"]))
    with av.open(str(out / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        overlay = [f.pts * stream.time_base for f in container.decode(stream)]
    assert len(overlay) == frames
    assert all(b > a for a, b in itertools.pairwise(overlay))
    return records


def _run_and_check(
    source: Path,
    checkpoint: Path,
    out: Path,
    *,
    max_frames: int | None = None,
    boxes: list[list[str]] = BOXES,
) -> list[dict]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    feed: list = []
    limit = ["--max-frames", str(max_frames)] if max_frames else []
    with MaskSubscriber(endpoint, timeout_ms=240_000) as sub:
        thread = collect(sub, feed)
        proc = samstream(
            "run",
            "--source",
            str(source),
            *_flat(boxes),
            "--weights",
            str(checkpoint),
            "--out",
            str(out),
            *FAST,
            *limit,
            "--set",
            f"transport.publish={json.dumps(endpoint)}",
        )
        thread.join(timeout=30)
    assert proc.returncode == 0, proc.stderr
    frames = decoded_frames(source, max_frames)
    assert f"frames in {frames}, out {frames}" in proc.stdout
    records = check_one_segmentation(out, frames, feed)
    repaired = sum("source_pts" in r for r in records)
    print(
        f"{source.name}: {frames} frames, pts {[r['pts'] for r in records[:8]]}..., "
        f"repaired {repaired}; summary:\n{proc.stdout}"
    )
    assert ("timestamps repaired" in proc.stdout) == bool(repaired), "the summary says so"
    return records


def _container_pts(path: Path, limit: int | None = None) -> list[int | None]:
    with av.open(str(path)) as container:
        pts = [frame.pts for frame in container.decode(video=0)]
    return pts[:limit] if limit else pts


@pytest.mark.slow
def test_b_frames_with_pts_equal_to_dts(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_pts_as_dts_mp4(tmp_path / "pts_as_dts.mp4", frames=24)
    raw = _container_pts(clip)
    assert raw != sorted(raw), "the clip must have out-of-order pts, or this proves nothing"
    records = _run_and_check(clip, checkpoint, tmp_path / "out")
    repaired = [r for r in records if "source_pts" in r]
    assert repaired and all(r["source_pts"] == raw[r["frame"]] for r in repaired)


@pytest.mark.slow
def test_avi_with_b_frames(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_b_frame_avi(tmp_path / "b_frames.avi", frames=24)
    raw = _container_pts(clip)
    assert raw != sorted(raw), "the clip must have out-of-order pts, or this proves nothing"
    _run_and_check(clip, checkpoint, tmp_path / "out")


@pytest.mark.slow
def test_variable_frame_rate_keeps_its_pts(checkpoint: Path, tmp_path: Path) -> None:
    pts_ms = [0, 40, 80, 200, 210, 220, 400, 440, 1000, 1033, 1066, 1500]
    clip = make_clip(
        tmp_path / "vfr.mp4",
        frames=len(pts_ms),
        size=(160, 120),
        pts=pts_ms,
        time_base=Fraction(1, 1000),
    )
    raw = _container_pts(clip)
    records = _run_and_check(clip, checkpoint, tmp_path / "out")
    assert [r["pts"] for r in records] == raw, "well-formed pts are kept exactly"
    assert not any("source_pts" in r for r in records)


@pytest.mark.slow
def test_concatenated_stream_with_a_size_change(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_concatenated_ts(tmp_path / "joined.ts", sizes=((160, 120), (128, 96)), frames=12)
    records = _run_and_check(clip, checkpoint, tmp_path / "out")
    sizes = {tuple(t["rle"]["size"]) for r in records for t in r["tracks"]}
    assert sizes == {(120, 160), (96, 128)}, "masks at each frame's own size"
    # The second clip keeps its frame spacing after the jump back (not squeezed a tick apart).
    gaps = [b["pts"] - a["pts"] for a, b in itertools.pairwise(records)]
    assert min(gaps) >= sorted(gaps)[len(gaps) // 2] / 2, gaps


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Megamind.avi", "Megamind_bugy.avi", "tree.avi", "vtest.avi"])
def test_opencv_sample_videos(checkpoint: Path, tmp_path: Path, name: str) -> None:
    video = OPENCV_DATA / name
    if not video.is_file():
        pytest.skip(f"opencv-doc's {name} is not installed")
    records = _run_and_check(
        video,
        checkpoint,
        tmp_path / "out",
        max_frames=30,
        boxes=[["--box", "100", "60", "260", "220"], ["--box", "200", "100", "330", "230"]],
    )
    raw = _container_pts(video, 30)
    if raw == sorted(raw):  # well-formed (tree.avi, vtest.avi): kept exactly
        assert [r["pts"] for r in records] == raw


# -- interrupted and resumed ----------------------------------------------------------------


def _start(args: list[str]) -> subprocess.Popen:
    # A session of its own: SIGINT to the group is what Ctrl-C in a terminal sends.
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_pngs(out: Path, count: int, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if len(list((out / "masks").glob("*.png"))) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before frame {count}: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no {count} frames written within {deadline_s} s")


def _outputs(out: Path) -> dict[str, bytes]:
    files = {name: (out / name).read_bytes() for name in ("masks.jsonl", "tracks.txt")}
    files.update({f"masks/{p.name}": p.read_bytes() for p in sorted((out / "masks").glob("*"))})
    return files


def _overlay_times(out: Path) -> list[Fraction]:
    with av.open(str(out / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        return [f.pts * stream.time_base for f in container.decode(stream)]


RESUMED_FRAMES = 36


@pytest.fixture(scope="module")
def uninterrupted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A clip and an uninterrupted run's outputs on it: what a resumed run must equal."""
    work = tmp_path_factory.mktemp("uninterrupted")
    clip = make_pts_as_dts_mp4(work / "clip.mp4", frames=RESUMED_FRAMES)
    full = work / "full"
    common = ["--source", str(clip), *_flat(BOXES), "--weights", str(checkpoint), *FAST]
    proc = samstream("run", *common, "--out", str(full))
    assert proc.returncode == 0, proc.stderr
    return clip, full


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_interrupt_then_resume_equals_an_uninterrupted_run(
    checkpoint: Path, tmp_path: Path, how: str, uninterrupted: tuple[Path, Path]
) -> None:
    frames = RESUMED_FRAMES
    clip, full = uninterrupted
    common = ["--source", str(clip), *_flat(BOXES), "--weights", str(checkpoint), *FAST]

    out = tmp_path / "resumed"
    stop_after = random.Random(how).randint(4, frames - 8)
    proc = _start(["run", *common, "--out", str(out)])
    _wait_for_pngs(out, stop_after, proc, deadline_s=240)
    if how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher and every node get it
    else:
        proc.send_signal(signal.SIGTERM)  # the launcher alone, as `kill` or systemd does
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode in (130, 143), stderr
    match = [line for line in stdout.splitlines() if line.startswith("interrupted at frame")]
    assert match, stdout
    kept = int(match[0].split()[3].rstrip(":"))
    assert stop_after <= kept < frames
    # The kept prefix is consistent: the same frames in every output, all final names.
    records = check_one_segmentation(out, kept)
    assert len(records) == kept
    mot_frames = {int(line.split(",")[0]) for line in (out / "tracks.txt").read_text().split()}
    assert mot_frames <= set(range(1, kept + 1))
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left behind"
    assert (out / "overlay.mp4").stat().st_mode & 0o777 == 0o644

    proc = samstream("run", *common, "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr
    print(
        f"{how} after {stop_after} PNGs: kept {kept} frames; resumed:\n{proc.stdout}"
        f"{proc.stderr[-400:]}"
    )
    assert _outputs(out) == _outputs(full), "resumed outputs differ from an uninterrupted run"
    assert _overlay_times(out) == _overlay_times(full)
    assert not (out / ".samstream").exists(), "a finished run leaves no resume state"

    again = samstream("run", *common, "--out", str(out), "--resume")
    assert again.returncode == 2 and "holds no interrupted run" in again.stderr


@pytest.mark.slow
def test_resume_with_another_config_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=60, size=(160, 120), fps=10)
    out = tmp_path / "out"
    common = ["--source", str(clip), "--weights", str(checkpoint), "--out", str(out)]
    proc = _start(["run", *common, *BOXES[0], *FAST])
    _wait_for_pngs(out, 3, proc, deadline_s=240)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    refused = samstream("run", *common, *BOXES[1], *FAST, "--resume")
    assert refused.returncode == 2
    assert "different tracker.prompts" in refused.stderr, refused.stderr
    refused = samstream("run", *common, *BOXES[0], "--image-size", "512", "--resume")
    assert "different encoder.image_size" in refused.stderr, refused.stderr
    other = make_clip(tmp_path / "other.mp4", frames=60, size=(160, 120), fps=10, moving_box=False)
    refused = samstream(
        "run",
        "--source",
        str(other),
        "--weights",
        str(checkpoint),
        "--out",
        str(out),
        *BOXES[0],
        *FAST,
        "--resume",
    )
    assert "different" in refused.stderr and "decoder.source" in refused.stderr


# -- checks before any node starts ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=10, size=(160, 120))


def _preflight_error(*args: str) -> str:
    start = time.monotonic()
    proc = samstream("run", *args, timeout=60)
    elapsed = time.monotonic() - start
    print(f"{elapsed:.2f} s: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "node " not in proc.stderr, "the error must come before any node starts"
    return proc.stderr


def test_preflight_errors(checkpoint: Path, small_clip: Path, tmp_path: Path) -> None:
    weights = ["--weights", str(checkpoint)]
    box = ["--box", "10", "10", "60", "60"]
    source = ["--source", str(small_clip)]
    assert "does not exist" in _preflight_error(
        "--source", str(tmp_path / "nope.mp4"), *box, *weights
    )
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00garbage" * 100)
    assert "junk.mp4" in _preflight_error("--source", str(junk), *box, *weights)
    missing = _preflight_error(*source, *box, "--weights", str(tmp_path / "none.pt"))
    assert "none.pt does not exist" in missing
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(50_000))
    assert "noise.pt is not a PyTorch checkpoint" in _preflight_error(
        *source, *box, "--weights", str(noise)
    )
    assert "no object to follow" in _preflight_error(*source, *weights)
    outside = _preflight_error(*source, "--box", "500", "500", "600", "600", *weights)
    assert "lies outside the 160x120 image" in outside
    zero = _preflight_error(*source, "--box", "10", "10", "10", "40", *weights)
    assert "x2 (10) must be greater than x1 (10)" in zero
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _preflight_error(*source, *box, *weights, "--device", "cuda")


@pytest.mark.parametrize("key", ["publish", "control"])
def test_a_taken_port_is_named_before_any_node_starts(
    key: str, checkpoint: Path, small_clip: Path
) -> None:
    """The feed's port or the control port held by another process: one error naming the
    key, from preflight (no node started, so no restart and no node log)."""
    import zmq

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    holder = zmq.Context.instance().socket(zmq.PUB)
    holder.bind(endpoint)
    try:
        error = _preflight_error(
            "--source",
            str(small_clip),
            "--box",
            "10",
            "10",
            "60",
            "60",
            "--weights",
            str(checkpoint),
            "--set",
            f"transport.{key}={json.dumps(endpoint)}",
        )
    finally:
        holder.close(linger=0)
    assert f"transport.{key} {endpoint} cannot be bound" in error


@pytest.mark.slow
def test_two_runs_with_default_endpoints_both_finish(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=12, size=(160, 120))
    procs = [
        _start(
            [
                "run",
                "--source",
                str(clip),
                *BOXES[0],
                "--weights",
                str(checkpoint),
                *FAST,
                "--out",
                str(tmp_path / f"out{i}"),
            ]
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
        assert "frames in 12, out 12" in stdout
    endpoints = {
        line.split("masks on ")[1]
        for _, err in results
        for line in err.splitlines()
        if line.startswith("samstream: masks on ")
    }
    assert len(endpoints) == 2, f"both runs took one feed endpoint: {endpoints}"
