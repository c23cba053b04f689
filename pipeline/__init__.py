"""samstream: streaming video segmentation with MobileSAM.

`from pipeline import SAM` loads torch lazily, so nodes that never touch the model (decoder,
publisher, clients) start fast and light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SAM", "MaskSubscriber", "Results"]


def __getattr__(name: str) -> Any:
    if name in ("SAM", "Results"):
        from pipeline import predictor

        return getattr(predictor, name)
    if name == "MaskSubscriber":
        from pipeline.wire.client import MaskSubscriber

        return MaskSubscriber
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
