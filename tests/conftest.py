"""Shared fixtures: random-weight checkpoints in the official layout, a real test image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.oracle import build_oracle

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked gpu is skipped without a CUDA device: asked when such a test is about
    to run, so that collecting (and running only the tests that need no torch) never
    imports torch."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def oracle_model():
    return build_oracle()


@pytest.fixture(scope="session")
def checkpoint(oracle_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight checkpoint in the official layout (a plain state dict, 439 tensors)."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "mobile_sam.pt"
    torch.save(oracle_model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def real_image() -> np.ndarray:
    """A real, non-square photo (opencv-doc's messi5.jpg, 548x342) or a textured stand-in."""
    from PIL import Image

    path = OPENCV_DATA / "messi5.jpg"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:342, 0:548]
    base = np.stack([xx % 64 * 4, yy % 48 * 5, (xx + yy) % 256], axis=-1)
    noise = rng.integers(0, 40, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)
