"""The official MobileSAM (the `mobilesam-mirror` package) as the tests' oracle."""

from __future__ import annotations

import warnings

import pytest


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
