"""A user's own ``pipeline.py`` or ``nodes/`` in the working directory cannot take the place
of the installed package in the node processes (``python -m`` would import them first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.media import make_clip


@pytest.mark.slow
def test_run_from_a_directory_with_its_own_pipeline_and_nodes(
    checkpoint: Path, tmp_path: Path
) -> None:
    work = tmp_path / "users-project"
    (work / "nodes").mkdir(parents=True)
    (work / "pipeline.py").write_text('raise SystemExit("the user\'s pipeline.py was imported")\n')
    (work / "nodes" / "__init__.py").write_text(
        'raise SystemExit("the user\'s nodes/ was imported")\n'
    )
    clip = make_clip(work / "clip.mp4", frames=4, size=(96, 64), fps=10)
    samstream = Path(sys.executable).with_name("samstream")
    proc = subprocess.run(
        [
            str(samstream),
            "run",
            "--source",
            clip.name,
            "--box",
            "10",
            "10",
            "50",
            "40",
            "--weights",
            str(checkpoint),
            "--out",
            "out",
            "--image-size",
            "256",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "was imported" not in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (work / "out" / "masks.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
