"""Image embeddings on the wire: the encoder's float tensor as float32, float16 or bfloat16
(bfloat16 travels as its uint16 bit patterns: numpy has no bfloat16)."""

from __future__ import annotations

import numpy as np
import torch


def embedding_to_wire(embedding: torch.Tensor, wire_dtype: str) -> np.ndarray:
    """CxHxW float tensor -> numpy in the wire dtype (bfloat16 as its uint16 bit patterns)."""
    if wire_dtype == "float16":
        return embedding.to(torch.float16).cpu().numpy()
    if wire_dtype == "bfloat16":
        return embedding.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return embedding.to(torch.float32).cpu().numpy()


def embedding_from_wire(array: np.ndarray, wire_dtype: str) -> torch.Tensor:
    """Inverse of embedding_to_wire -> float32 tensor (shares no memory with the message)."""
    if wire_dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(array, dtype=np.float32))
