"""The state an interrupted offline run leaves for --resume, and the checks of a resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from support.media import make_clip

from pipeline.cli import run_prompts
from pipeline.config import Override, PromptConfig, load_config, parse_set
from pipeline.run import resume
from pipeline.run.resume import ResumeError


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=5, size=(64, 48))


def _config(clip: Path, out: Path, *extra: str):
    base = [
        Override("decoder.source", str(clip)),
        Override("publisher.out", str(out)),
        Override("tracker.prompts", [{"box": [1, 1, 20, 20]}]),
    ]
    return load_config(None, [*base, *map(parse_set, extra)])


def test_identity_ignores_what_does_not_change_masks(clip: Path, tmp_path: Path) -> None:
    base = resume.run_identity(_config(clip, tmp_path))
    same = resume.run_identity(
        _config(
            clip,
            tmp_path,
            "encoder.threads=1",
            "decoder.max_frames=3",
            "transport.hwm=2",
            "resume.enabled=true",
        )
    )
    assert base == same
    other = resume.run_identity(_config(clip, tmp_path, "tracker.min_score=0.7"))
    assert other != base


def test_plan_resume(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    identity = resume.run_identity(_config(clip, out))
    with pytest.raises(ResumeError, match="holds no interrupted run"):
        resume.plan_resume(out, identity)
    resume.begin_run(out, identity)
    with pytest.raises(ResumeError, match="did not stop cleanly"):
        resume.plan_resume(out, identity)
    resume.mark_interrupted(out, 7)
    assert resume.interrupted_frames(out) == 7
    assert resume.plan_resume(out, identity) == resume.ResumePoint(7, None)
    changed = resume.run_identity(
        _config(clip, out, "encoder.image_size=512", "tracker.prompts=[{box: [2, 2, 20, 20]}]")
    )
    with pytest.raises(ResumeError, match=r"different encoder\.image_size, tracker\.prompts"):
        resume.plan_resume(out, changed)
    # The tracker's state after frame 6 is the shortcut; one after frame 7 or later is not.
    resume.save_tracker_snapshots(out, {5: ({"a": 1}, {}), 6: ({"a": 2}, {}), 7: ({"a": 3}, {})})
    assert resume.plan_resume(out, identity) == resume.ResumePoint(7, 6)
    resume.forget_run(out)
    assert not (out / resume.STATE_DIR).exists()


def test_a_changed_source_file_is_another_job(clip: Path, tmp_path: Path) -> None:
    config = _config(clip, tmp_path)
    before = resume.run_identity(config)
    make_clip(clip, frames=5, size=(64, 48), moving_box=False)  # same name, other content
    assert resume.run_identity(config) != before


def test_tracker_snapshots_round_trip(tmp_path: Path) -> None:
    logits = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
    resume.save_tracker_snapshots(
        tmp_path, {3: ({"next_id": 3, "ids": [1, 2]}, {"logits": logits})}
    )
    assert resume.saved_tracker_frames(tmp_path) == [3]
    data, arrays = resume.load_tracker_snapshot(tmp_path, 3)
    assert data == {"next_id": 3, "ids": [1, 2]}
    assert np.array_equal(arrays["logits"], logits) and arrays["logits"].dtype == np.float32
    with pytest.raises(ResumeError, match="no tracker state after frame 4"):
        resume.load_tracker_snapshot(tmp_path, 4)


def test_the_live_state_writer_never_blocks_and_ends_with_the_latest_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """submit returns while a write is under way; the states handed over meanwhile collapse
    into the latest; a failing write is logged once and the writer goes on."""
    real_save = resume.save_tracker_snapshots
    release = threading.Event()
    written: list[int] = []
    failures = {"left": 0}

    def slow_save(out_dir: Path, snapshots: dict) -> Path:
        release.wait(timeout=60)
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("No space left on device")
        written.extend(snapshots)
        return real_save(out_dir, snapshots)

    monkeypatch.setattr(resume, "save_tracker_snapshots", slow_save)
    writer = resume.LiveStateWriter(tmp_path)

    def state(frame: int) -> resume.Snapshot:
        return {"frame": frame}, {"logits": np.full((4, 4), frame, dtype=np.float32)}

    writer.submit(1, state(1))
    assert not writer.wait(timeout=0.2)  # frame 1 is being written (held by slow_save)
    for frame in range(2, 6):
        writer.submit(frame, state(frame))  # returns at once: the writer is busy
    release.set()
    assert writer.wait(timeout=60)
    assert written == [1, 5]  # 2-4 were replaced while 1 was written
    data, arrays = resume.load_tracker_snapshot(tmp_path, 5)
    assert data == {"frame": 5} and arrays["logits"][0, 0] == 5

    failures["left"] = 3
    with caplog.at_level("INFO", logger="pipeline.run.resume"):
        for frame in range(6, 10):
            writer.submit(frame, state(frame))
            assert writer.wait(timeout=60)
    assert [r.getMessage() for r in caplog.records] == [
        "tracker: could not save its live state (No space left on device); retrying",
        "tracker: live state saved again (after frame 9)",
    ]
    assert resume.saved_tracker_frames(tmp_path) == [9]


def test_a_failed_state_write_leaves_the_previous_state_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resume.save_tracker_snapshots(tmp_path, {1: ({"frame": 1}, {})})

    def disk_full(file, **arrays) -> None:
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume.np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        resume.save_tracker_snapshots(tmp_path, {2: ({"frame": 2}, {})})
    assert sorted(p.name for p in resume.state_dir(tmp_path).iterdir()) == [resume.TRACKER_FILE]
    assert resume.saved_tracker_frames(tmp_path) == [1]


def test_a_failed_run_state_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        resume.begin_run(tmp_path, {"a": 1})
    assert list(resume.state_dir(tmp_path).iterdir()) == []


def test_a_damaged_tracker_state_only_costs_the_shortcut(tmp_path: Path) -> None:
    path = resume.state_dir(tmp_path) / resume.TRACKER_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz file")
    assert resume.saved_tracker_frames(tmp_path) == []
    with path.open("wb") as file:  # a plain array planted under the name
        np.save(file, np.arange(3))
    assert resume.saved_tracker_frames(tmp_path) == []
    manifest = json.dumps({"version": resume.STATE_VERSION, "frames": [3]}).encode()
    np.savez(path, manifest=np.frombuffer(manifest, dtype=np.uint8))
    assert resume.saved_tracker_frames(tmp_path) == []
    with pytest.raises(ResumeError, match="no tracker state after frame 3"):
        resume.load_tracker_snapshot(tmp_path, 3)


def test_the_tracker_file_is_closed_when_it_has_no_such_frame_or_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Any] = []
    real_load = np.load

    def load(*args: Any, **kwargs: Any) -> Any:
        opened.append(real_load(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(resume.np, "load", load)
    resume.save_tracker_snapshots(tmp_path, {3: ({"frame": 3}, {"logits": np.zeros(2)})})
    with pytest.raises(ResumeError, match="no tracker state after frame 4"):
        resume.load_tracker_snapshot(tmp_path, 4)
    # A manifest of another version is no state either.
    path = resume.state_dir(tmp_path) / resume.TRACKER_FILE
    manifest = json.dumps({"version": resume.STATE_VERSION + 1, "frames": {}}).encode()
    np.savez(path, manifest=np.frombuffer(manifest, dtype=np.uint8))
    assert resume.saved_tracker_frames(tmp_path) == []
    assert len(opened) == 2 and all(archive.zip is None for archive in opened)  # closed


def test_run_prompts_read_like_predict() -> None:
    box = [1.0, 2.0, 30.0, 40.0]
    assert run_prompts([box], None, None) == [{"box": box}]
    one = run_prompts([box], [[5.0, 6.0], [9.0, 9.0]], [1, 0])
    assert one == [{"box": box, "points": [[5.0, 6.0], [9.0, 9.0]], "labels": [1, 0]}]
    assert run_prompts(None, [[5.0, 6.0]], None) == [{"points": [[5.0, 6.0]], "labels": [1]}]
    with pytest.raises(ValueError, match="2 --box values and --point values"):
        run_prompts([box, box], [[5.0, 6.0]], None)
    with pytest.raises(ValueError, match="2 --label values for 1 --point"):
        run_prompts(None, [[5.0, 6.0]], [1, 0])
    prompt = PromptConfig(
        **{k: tuple(map(tuple, v)) if k == "points" else tuple(v) for k, v in one[0].items()}
    )
    assert msgspec.structs.asdict(prompt)["labels"] == (1, 0)
