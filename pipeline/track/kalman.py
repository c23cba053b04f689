"""Boxes and the Kalman track: one filtered box per object.

Coordinates are ``(x1, y1, x2, y2)`` pixels of the original frame with exclusive ``x2``/``y2``
(a mask whose True pixels span columns 3..7 has ``x1 = 3, x2 = 8``). A track's state is
SORT's ``[cx, cy, w, h, vcx, vcy, vw, vh]``: pixels and pixels per frame, constant velocity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from filterpy.kalman import KalmanFilter

from pipeline.config import TrackerConfig
from pipeline.wire.messages import TrackState

Box = tuple[float, float, float, float]

_MIN_SIZE = 1.0  # pixels; a box narrower than one pixel cannot prompt the decoder
_INIT_POSITION_SCALE = 10.0  # a prompt box is this many measurement-noise stds uncertain
_INIT_VELOCITY_STD = 50.0  # pixels per frame; unknown at creation, learnt from two measurements


def box_to_state(box: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(x1, y1, x2, y2)`` -> ``[cx, cy, w, h]`` (float64, shape (4,))."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    return np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1])


def state_to_box(z: Sequence[float] | np.ndarray) -> Box:
    """``[cx, cy, w, h, ...]`` (extra entries such as velocities are ignored) -> box."""
    cx, cy, w, h = (float(v) for v in np.asarray(z, dtype=np.float64).reshape(-1)[:4])
    return (cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes; 0.0 when both are empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (
        max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
        + max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
        - inter
    )
    return inter / union if union > 0.0 else 0.0


def as_box(values: Sequence[float]) -> Box:
    """Four numbers as a Box of floats."""
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def clip_box(box: Box, frame_size: tuple[int, int]) -> Box:
    """The box clipped to the (H, W) frame."""
    height, width = frame_size
    # Written out, not np.clip or a loop: this runs per track per frame (1.2 us; a
    # generator over the four coordinates took 2.3 us, np.clip more still).
    return (
        min(max(box[0], 0.0), width),
        min(max(box[1], 0.0), height),
        min(max(box[2], 0.0), width),
        min(max(box[3], 0.0), height),
    )


def _transition(dt: int, process_noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Constant-velocity F and Q for a step of ``dt`` frames (frames may be dropped live).

    Q is the discrete white-noise-acceleration model per coordinate, so the uncertainty of a
    track grows with the time it coasts, not with the number of calls.
    """
    f = np.eye(8)
    f[:4, 4:] = dt * np.eye(4)
    var = process_noise**2
    q = np.zeros((8, 8))
    q[:4, :4] = np.eye(4) * var * dt**4 / 4.0
    q[:4, 4:] = q[4:, :4] = np.eye(4) * var * dt**3 / 2.0
    q[4:, 4:] = np.eye(4) * var * dt**2
    return f, q


def _keep_size_positive(x: np.ndarray) -> np.ndarray:
    """Clamp w/h of a state column to _MIN_SIZE; a clamped size also stops shrinking."""
    for size, rate in ((2, 6), (3, 7)):
        if x[size, 0] < _MIN_SIZE:
            x[size, 0] = _MIN_SIZE
            x[rate, 0] = max(x[rate, 0], 0.0)
    return x


class Track:
    """One object: a Kalman filter over its box plus the bookkeeping the tracker publishes.

    ``kf`` state: ``[cx, cy, w, h, vcx, vcy, vw, vh]`` (pixels, pixels/frame), measurement
    ``[cx, cy, w, h]``.
    """

    def __init__(self, box: Box, *, settings: TrackerConfig | None = None) -> None:
        self.state = TrackState.TENTATIVE
        self.last_frame = 0  # the frame index it was last decoded on (the tracker's to set)
        self.frames_since_update = 0
        self.hits = 0
        self.last_score = 0.0
        self.last_innovation = 0.0
        self.last_mask_logits: np.ndarray | None = None
        self._settings = settings if settings is not None else TrackerConfig()
        self.kf = KalmanFilter(dim_x=8, dim_z=4)
        self.kf.F, self.kf.Q = _transition(1, self._settings.process_noise)
        self.kf.H = np.hstack([np.eye(4), np.zeros((4, 4))])
        self.kf.R = np.eye(4) * self._settings.measurement_noise**2
        self.reset(box)

    @property
    def predicted_box(self) -> Box:
        """Box of the filter's current state (after ``predict()``, the prediction)."""
        return state_to_box(self.kf.x)

    def reset(self, box: Box) -> None:
        """Restart the filter at ``box`` with unknown velocity (used by corrections): its next
        frame is a first frame, with no prediction to agree with."""
        self.restarted = True
        r = self._settings.measurement_noise
        self.kf.x = _keep_size_positive(np.concatenate([box_to_state(box), np.zeros(4)])[:, None])
        self.kf.P = np.diag([(_INIT_POSITION_SCALE * r) ** 2] * 4 + [_INIT_VELOCITY_STD**2] * 4)
        self.last_mask_logits = None  # they describe the old position

    def peek(self, dt: int = 1) -> Box:
        """The box ``predict(dt)`` would return, without changing the filter."""
        f, _ = _transition(dt, self._settings.process_noise)
        return state_to_box(_keep_size_positive(f @ self.kf.x))

    def predict(self, dt: int = 1) -> Box:
        """Advance the filter by ``dt`` frames; returns the predicted box."""
        f, q = _transition(dt, self._settings.process_noise)
        self.kf.predict(F=f, Q=q)
        self.kf.x = _keep_size_positive(self.kf.x)
        return self.predicted_box

    def innovation(self, box: Box) -> float:
        """Mahalanobis distance of a measured box from the current state (no update)."""
        y = box_to_state(box)[:, None] - self.kf.H @ self.kf.x
        s = self.kf.H @ self.kf.P @ self.kf.H.T + self.kf.R
        return math.sqrt(max(0.0, float((y.T @ np.linalg.solve(s, y)).item())))

    def update(self, box: Box) -> None:
        """Fuse a trusted measured box."""
        self.last_innovation = self.innovation(box)
        self.kf.update(box_to_state(box)[:, None])
        self.kf.x = _keep_size_positive(self.kf.x)
        self.hits += 1
        self.frames_since_update = 0

    def rescale(self, sx: float, sy: float) -> None:
        """Express the filter in a frame resized by ``sx`` (x) and ``sy`` (y).

        The state is linear in pixels, so ``x' = S x`` and ``P' = S P S^T`` with
        ``S = diag(sx, sy, sx, sy, sx, sy, sx, sy)``: positions, sizes, their rates and every
        covariance between them stay consistent. R and Q stay: they are the noise of one
        mask box coordinate and of the motion in pixels, whatever the resolution.
        """
        scale = np.diag([sx, sy, sx, sy] * 2)
        self.kf.x = _keep_size_positive(scale @ self.kf.x)
        self.kf.P = scale @ self.kf.P @ scale.T
        # The low-res logits lie on the decoder's grid of the old frame (padded to a square);
        # after a resize they would prompt a shifted mask. One box-only frame is cheap.
        self.last_mask_logits = None
