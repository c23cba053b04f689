"""Checkpoint loading and the weights' origin: every error names the file and the problem."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model.checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint
from pipeline.model.sam import build_mobile_sam
from pipeline.model.weights import WeightsUnavailableError, download_weights, resolve_weights


def test_official_layout_has_439_tensors_and_loads_strictly(checkpoint: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    assert len(state) == 439
    assert any(k.startswith("image_encoder.head.") for k in state)
    assert any(k.startswith("image_encoder.norm_head.") for k in state)
    model = build_mobile_sam()
    load_checkpoint(model, checkpoint)
    ours = model.state_dict()
    filtered = checkpoint_filter_fn(state)
    assert set(filtered) == set(ours)
    for key, value in filtered.items():
        assert torch.equal(ours[key], value), key


def _save_modified(checkpoint: Path, tmp_path: Path, edit) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt does not exist"):
        load_checkpoint(build_mobile_sam(), missing)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a PyTorch checkpoint"):
        load_checkpoint(build_mobile_sam(), junk)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_bytes_are_not_a_checkpoint(tmp_path: Path, seed: int) -> None:
    """Random bytes fail the weights-only unpickler too, but they would run nothing: the
    message must say "not a checkpoint", not "would run code"."""
    junk = tmp_path / "random.pt"
    junk.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(CheckpointError, match=r"random\.pt is not a PyTorch checkpoint"):
        load_checkpoint(build_mobile_sam(), junk)


class _RunsCode:
    """Unpickling this would call print: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path, capsys) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"image_encoder.x": _RunsCode()}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt was refused: .*would run code"):
        load_checkpoint(build_mobile_sam(), evil)
    assert "ran code" not in capsys.readouterr().out


def test_missing_key_is_named(checkpoint: Path, tmp_path: Path) -> None:
    key = "mask_decoder.iou_token.weight"
    path = _save_modified(checkpoint, tmp_path, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=rf"edited\.pt is missing 1 key\(s\), first: '{key}'"):
        load_checkpoint(build_mobile_sam(), path)


def test_unexpected_key_is_named(checkpoint: Path, tmp_path: Path) -> None:
    path = _save_modified(
        checkpoint, tmp_path, lambda s: s.update({"mask_decoder.extra": torch.zeros(1)})
    )
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\), first: 'mask_decoder\.extra'"):
        load_checkpoint(build_mobile_sam(), path)


def test_wrong_shape_names_key_and_shapes(checkpoint: Path, tmp_path: Path) -> None:
    key = "prompt_encoder.no_mask_embed.weight"
    path = _save_modified(checkpoint, tmp_path, lambda s: s.update({key: torch.zeros(1, 128)}))
    with pytest.raises(
        CheckpointError, match=rf"'{key}' has shape \(1, 128\), expected \(1, 256\)"
    ):
        load_checkpoint(build_mobile_sam(), path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=r"tensor\.pt holds a Tensor, not a state dict"):
        load_checkpoint(build_mobile_sam(), path)


# --- where weights come from ------------------------------------------------------------


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No weights anywhere: an empty cache, no environment, an empty current folder (a
    mobile_sam.pt where the tests are started must not change what they find)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAMSTREAM_CACHE", str(cache))
    monkeypatch.delenv("SAMSTREAM_WEIGHTS", raising=False)
    monkeypatch.delenv("SAMSTREAM_WEIGHTS_URL", raising=False)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return cache


def test_explicit_path_wins(checkpoint: Path, empty_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAMSTREAM_WEIGHTS", "/nonexistent/elsewhere.pt")
    assert resolve_weights(checkpoint) == checkpoint


def test_env_then_cache(checkpoint: Path, empty_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAMSTREAM_WEIGHTS", str(checkpoint))
    assert resolve_weights("mobile_sam.pt") == checkpoint
    monkeypatch.delenv("SAMSTREAM_WEIGHTS")
    empty_cache.mkdir(parents=True)
    cached = empty_cache / "mobile_sam.pt"
    cached.write_bytes(checkpoint.read_bytes())
    assert resolve_weights("mobile_sam.pt") == cached


def test_the_bare_name_finds_the_environment_then_the_cache_then_the_current_folder(
    checkpoint: Path, empty_cache: Path, monkeypatch
) -> None:
    here = Path.cwd() / "mobile_sam.pt"
    here.write_bytes(checkpoint.read_bytes())
    monkeypatch.setenv("SAMSTREAM_WEIGHTS", str(checkpoint))
    assert resolve_weights("mobile_sam.pt") == checkpoint  # was the current folder's file
    monkeypatch.delenv("SAMSTREAM_WEIGHTS")
    empty_cache.mkdir(parents=True)
    cached = empty_cache / "mobile_sam.pt"
    cached.write_bytes(checkpoint.read_bytes())
    assert resolve_weights("mobile_sam.pt") == cached
    cached.unlink()
    assert resolve_weights("mobile_sam.pt").resolve() == here.resolve()
    assert resolve_weights("./mobile_sam.pt") == Path("./mobile_sam.pt")  # a path: as given


def test_missing_explicit_path_is_an_error(empty_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"my_weights\.pt does not exist"):
        resolve_weights("my_weights.pt")


def test_bad_env_path_is_an_error(empty_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAMSTREAM_WEIGHTS", "/nowhere/w.pt")
    with pytest.raises(FileNotFoundError, match=r"SAMSTREAM_WEIGHTS=/nowhere/w\.pt"):
        resolve_weights(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_download_fails_fast_and_says_how_to_pass_a_file(
    empty_cache: Path, monkeypatch
) -> None:
    # Nothing listens on this loopback port: the connection is refused, as offline.
    monkeypatch.setenv("SAMSTREAM_WEIGHTS_URL", f"http://127.0.0.1:{_free_port()}/mobile_sam.pt")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"--weights PATH.*SAMSTREAM_WEIGHTS"):
        resolve_weights("mobile_sam.pt")
    assert time.monotonic() - start < 10
    assert not any(empty_cache.glob("*")), "no partial file may be left in the cache"


def test_silent_server_times_out(empty_cache: Path) -> None:
    """A server that accepts and never answers: the read timeout ends the download."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/mobile_sam.pt"
        start = time.monotonic()
        with pytest.raises(WeightsUnavailableError, match="could not download"):
            download_weights(url, empty_cache / "mobile_sam.pt", timeout_s=1.0)
        assert time.monotonic() - start < 5
    assert not (empty_cache / "mobile_sam.pt").exists()


def test_download_from_loopback_server_into_cache(checkpoint: Path, empty_cache: Path) -> None:
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(checkpoint.parent), **k
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{checkpoint.name}"
        path = resolve_weights("mobile_sam.pt", url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert path == empty_cache / "mobile_sam.pt"
    assert path.read_bytes() == checkpoint.read_bytes()
    assert [p.name for p in empty_cache.iterdir()] == ["mobile_sam.pt"]  # no temporaries left
    load_checkpoint(build_mobile_sam(), path)
