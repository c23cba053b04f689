"""Per-object cost of the tracker and the publisher: prints milliseconds for 1/8/32/50 objects.

    python tests/support/per_object_timing.py [--weights mobile_sam.pt] [--frames 6]
        [--only tracker] [--backend exact|torch|onnxruntime|openvino|auto ...] [--threads N]
        [--counts 1 8]

Not a test (no assertions on time: the machine is shared): a script to compare the stages as
the object count grows, run the same way before and after a change.

Tracker: the real TrackerNode (SamMaskDecoder, image size 1024) on one 1280x720 frame's
embedding, N box prompts of 100-300 px, frames after the first (mask prompts, steady state).
Two kinds of masks:

- ``random``: the random-weight decoder's own output. Its masks are not object-like (they
  spread over most of the frame), the worst case for anything that works per object area;
- ``objects``: the decoder network runs as usual (its time counts), but its low-res logits are
  replaced by smooth blobs of each box's size, as a trained model's masks look.

``network`` is the time inside MobileSAM's prompt encoder + mask decoder (per-object compute
that no mask representation changes), run by the tracker's mask decoder backend
(``tracker.backend``; ``exact`` is MobileSAM.decode in torch, the tracker's network before
the backends); ``rest`` is everything else the node does. Several backends are timed
interleaved, frame by frame, so that the machine's other load hits them alike.

Publisher: the PublisherNode with every output on (PNG, JSON lines, MOT, overlay) at 640x480,
N elliptic masks of 40-160 px; ``publish`` is the node's own figure, ``wire`` the
MaskMessage's encode + decode (what the tracker -> publisher -> subscriber hops add).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nodes.publisher import PublisherNode  # noqa: E402
from nodes.tracker import TrackerNode  # noqa: E402
from pipeline.config import PublisherConfig, TrackerConfig  # noqa: E402
from pipeline.predictor import SAM  # noqa: E402
from pipeline.wire.messages import EmbeddingMessage, FrameMeta, MaskMessage, TrackRecord  # noqa: E402
from support.oracle import build_oracle  # noqa: E402

COUNTS = (1, 8, 32, 50)


def boxes_for(count: int, size: tuple[int, int], low: float, high: float, seed: int) -> np.ndarray:
    """(count, 4) float32 boxes of sides in [low, high] px inside a frame of (H, W)."""
    rng = np.random.default_rng(seed)
    height, width = size
    out = []
    for _ in range(count):
        w, h = rng.uniform(low, high, 2)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        out.append([x, y, x + w, y + h])
    return np.array(out, dtype=np.float32)


def blob_logits(boxes: torch.Tensor, grid: int, long_side: int) -> torch.Tensor:
    """(B, 1, grid, grid) logits: an ellipse inscribed in each box (input-frame pixels),
    +12 at the centre, falling to -20 outside, with a little texture."""
    scale = grid / long_side
    ys = torch.arange(grid, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(grid, dtype=torch.float32)[None, :] + 0.5
    out = []
    for x1, y1, x2, y2 in (boxes.float() * scale).tolist():
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        rx, ry = max((x2 - x1) / 2, 1.0), max((y2 - y1) / 2, 1.0)
        value = 12.0 * (1 - ((xs - cx) / rx) ** 2 - ((ys - cy) / ry) ** 2)
        texture = 0.5 * torch.sin(xs * 1.7) * torch.cos(ys * 1.3)
        out.append((value + texture).clamp(min=-20.0))
    return torch.stack(out)[:, None]


class TimedNetwork:
    """Wraps a mask decoder backend's decode: adds up its time; optionally swaps its logits
    for blobs."""

    def __init__(self, backend, model: torch.nn.Module, *, blobs: bool) -> None:
        self.inner = backend.decode
        self.blobs = blobs
        self.grid = model.prompt_encoder.mask_input_size[0]
        self.long_side = model.img_size
        self.seconds = 0.0

    def __call__(self, embedding, *, boxes=None, **kwargs):
        start = time.perf_counter()
        low, scores = self.inner(embedding, boxes=boxes, **kwargs)
        self.seconds += time.perf_counter() - start
        if self.blobs and boxes is not None:
            low = blob_logits(torch.from_numpy(boxes), self.grid, self.long_side).to(low.device)
        return low, torch.full_like(scores, 0.9)


def tracker_node(weights: Path, backend: str, count: int, size: tuple[int, int], blobs: bool):
    """A TrackerNode at 1024 px with `count` boxes, its decoder network timed."""
    from pipeline.infer.mask_decoder import TorchMaskDecoder

    config = TrackerConfig(
        device="cpu",
        min_score=0.0,
        min_agreement=0.0,
        backend="torch" if backend == "exact" else backend,
    )
    node = TrackerNode(config, weights=str(weights), image_size=1024)
    node.setup()
    if backend == "exact":  # the tracker's network before the backends: MobileSAM.decode
        node.decoder.backend = TorchMaskDecoder(model=node.decoder.model, exact=True)
    network = TimedNetwork(node.decoder.backend, node.decoder.model, blobs=blobs)
    node.decoder.backend.decode = network
    for box in boxes_for(count, size, 100, 300, seed=count):
        node.tracker.commands.add(box=box)
    return node, network


def time_trackers(
    weights: Path, embedded, backends: list[str], count: int, frames: int, blobs: bool
) -> dict[str, tuple[float, float, float, float]]:
    """(total, network, rest, cpu) median ms per frame after the first, per backend; the
    backends take turns frame by frame. cpu: the process's CPU time (all its threads),
    which other processes' load disturbs far less than wall time on a shared machine."""
    nodes = {b: tracker_node(weights, b, count, embedded.original_size, blobs) for b in backends}
    totals: dict[str, list[float]] = {b: [] for b in backends}
    nets: dict[str, list[float]] = {b: [] for b in backends}
    cpus: dict[str, list[float]] = {b: [] for b in backends}
    for frame in range(frames):
        meta = FrameMeta("bench", frame, frame, frame, (1, 25), time.time())
        msg = EmbeddingMessage(
            meta=meta,
            embedding=embedded.embedding[0].numpy(),
            embedding_dtype="float32",
            original_size=embedded.original_size,
            input_size=embedded.input_size,
        )
        for backend, (node, network) in nodes.items():
            network.seconds = 0.0
            cpu, start = time.process_time(), time.perf_counter()
            node.process(msg)
            totals[backend].append((time.perf_counter() - start) * 1000)
            cpus[backend].append((time.process_time() - cpu) * 1000)
            nets[backend].append(network.seconds * 1000)
    out = {}
    for backend in backends:
        total, net = statistics.median(totals[backend][1:]), statistics.median(nets[backend][1:])
        out[backend] = (total, net, total - net, statistics.median(cpus[backend][1:]))
    return out


def ellipse_masks(count: int, size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, H, W) bool ellipses inscribed in boxes of 40-160 px, and the boxes."""
    height, width = size
    boxes = boxes_for(count, size, 40, 160, seed)
    ys, xs = np.mgrid[0:height, 0:width]
    masks = np.zeros((count, height, width), dtype=bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks[i] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    return masks, boxes


def mask_message(frame: int, masks: np.ndarray, boxes: np.ndarray, image: np.ndarray):
    tracks = tuple(
        TrackRecord(
            track_id=i + 1,
            box=tuple(float(v) for v in box),
            score=0.9,
            state="tracked",
            frames_since_update=0,
            innovation=0.5,
        )
        for i, box in enumerate(boxes)
    )
    meta = FrameMeta("bench", frame, frame, frame * 1000, (1, 25000), time.time())
    size = (image.shape[0], image.shape[1])
    if hasattr(MaskMessage, "dense_masks"):  # masks as windows, as the tracker sends them
        from pipeline.wire.masks import RegionMask

        regions = tuple(RegionMask.from_dense(mask) for mask in masks)
        return MaskMessage(meta=meta, frame_size=size, tracks=tracks, masks=regions, image=image)
    return MaskMessage(meta=meta, frame_size=size, tracks=tracks, masks=masks, image=image)


def time_publisher(count: int, frames: int) -> tuple[float, float, int]:
    size = (480, 640)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    masks, boxes = ellipse_masks(count, size, seed=count)
    with tempfile.TemporaryDirectory() as out:
        node = PublisherNode(PublisherConfig(out=out), budget_ms=400.0)
        node.setup()
        publish, wire, nbytes = [], [], 0
        for frame in range(frames):
            msg = mask_message(frame, masks, boxes, image)
            published = node.process(msg)[0]
            publish.append(published.timings["publish"])
            start = time.perf_counter()
            parts = published.to_frames()
            MaskMessage.from_frames([bytes(p) for p in parts])
            wire.append((time.perf_counter() - start) * 1000)
            nbytes = sum(len(bytes(p)) for p in parts)
        if node.writer is not None:
            node.writer.commit()
    return statistics.median(publish[1:]), statistics.median(wire[1:]), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--weights", type=Path, help="a checkpoint (default: random weights)")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--only", choices=("tracker", "publisher"))
    parser.add_argument(
        "--backend",
        nargs="+",
        default=["torch"],
        choices=("exact", "torch", "onnxruntime", "openvino", "auto"),
        help="mask decoder backends to time, interleaved (exact: MobileSAM.decode in torch)",
    )
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--kinds", nargs="+", default=["objects", "random"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the ONNX backends' budget
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only != "publisher":
        weights = args.weights
        if weights is None:
            weights = Path(tempfile.mkdtemp()) / "mobile_sam.pt"
            torch.save(build_oracle().state_dict(), weights)
        sam = SAM(weights, device="cpu", image_size=1024)
        image = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
        embedded = sam.set_image(image)
        for kind in args.kinds:
            print(f"tracker, 1280x720, image size 1024, {kind} masks: ms per frame")
            first: dict[str, tuple[float, float]] = {}
            for count in args.counts:
                timed = time_trackers(
                    weights, embedded, args.backend, count, args.frames, kind == "objects"
                )
                for backend, (total, net, rest, cpu) in timed.items():
                    wall1, cpu1 = first.setdefault(backend, (total, cpu))
                    print(
                        f"  {backend:12s} {count:3d} objects: total {total:7.1f}  "
                        f"network {net:7.1f}  rest {rest:6.1f}  cpu {cpu:7.1f}  "
                        f"x{total / wall1:5.2f} (cpu x{cpu / cpu1:5.2f}) of {args.counts[0]}"
                    )
    if args.only != "tracker":
        print("publisher, 640x480, PNG + jsonl + MOT + overlay: ms per frame")
        for count in COUNTS:
            publish, wire, nbytes = time_publisher(count, args.frames)
            print(
                f"  {count:3d} objects: publish {publish:7.1f}  wire {wire:6.2f}  "
                f"message {nbytes / 1024:7.1f} KiB"
            )


if __name__ == "__main__":
    main()
