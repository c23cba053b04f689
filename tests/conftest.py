"""Shared fixtures: random-weight checkpoints in the official layout, a real test image."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def build_oracle(seed: int = 0):
    """The official MobileSAM vit_t with seeded random weights (and non-trivial BN stats)."""
    mobile_sam = pytest.importorskip("mobile_sam")
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = mobile_sam.sam_model_registry["vit_t"]()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # The default init leaves zero biases, unit norms and empty BN statistics: perturb
        # everything so that no part of the network is an identity the test cannot see.
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=generator))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=generator))
    # The official model caches attention biases in eval(): call it after the weights change.
    return model.eval()


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
