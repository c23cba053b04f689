"""A slow encoder for the live tests, from outside the product: a test puts this directory
on PYTHONPATH and sets SAMSTREAM_SLOW_ENCODER_MS; Python imports this module at start-up in
every process, and in the encoder node's process (``... node encoder --run-file ...``) every
batch then takes that much longer inside the encoder's timed step."""

from __future__ import annotations

import os
import sys
import time

_DELAY_MS = float(os.environ.get("SAMSTREAM_SLOW_ENCODER_MS", "0") or 0)

if _DELAY_MS > 0 and sys.argv[1:3] == ["node", "encoder"]:
    from pipeline.predictor import SAM

    _encode_batch = SAM.encode_batch

    def _slow_encode_batch(self, images):  # type: ignore[no-untyped-def]
        result = _encode_batch(self, images)
        time.sleep(_DELAY_MS / 1000)
        return result

    SAM.encode_batch = _slow_encode_batch  # type: ignore[method-assign]
