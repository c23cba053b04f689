"""The `samstream` command line: predict (one image), run, node, prompt, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("samstream")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment objects in one image",
        description="Segment the objects given by boxes and/or points in one image. All "
        "--point prompts belong to one object (with the --box, if there is one box).",
    )
    p.add_argument("image", help="image file (JPEG, PNG, ...)")
    p.add_argument("--box", nargs=4, type=float, action="append", metavar=("X1", "Y1", "X2", "Y2"),
                   help="a box around one object (repeatable)")
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"),
                   help="a point on the object (repeatable)")
    p.add_argument("--label", type=int, action="append", choices=(0, 1),
                   help="label of each --point in order: 1 foreground (default), 0 background")
    p.add_argument("--weights", default="mobile_sam.pt",
                   help="mobile_sam.pt path (default: $SAMSTREAM_WEIGHTS, cache, download)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--image-size", type=int, default=1024, help="encoder input side (1024)")
    p.add_argument("--multimask", action="store_true", help="three masks per object")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from pipeline.drawing import draw_overlay
    from pipeline.predictor import SAM, load_image
    from pipeline.tracking import mask_box

    image = load_image(args.image)
    points = labels = None
    if args.point:
        labels = args.label or []
        if len(labels) > len(args.point):
            raise ValueError(f"{len(labels)} --label values for {len(args.point)} --point values")
        labels = labels + [1] * (len(args.point) - len(labels))
        points, labels = [args.point], [labels]  # all points describe one object
    if not args.box and not points:
        raise ValueError("give at least one --box or --point")
    model = SAM(args.weights, device=args.device, dtype=args.dtype, image_size=args.image_size)
    result = model.predict(image, bboxes=args.box, points=points, labels=labels,
                           multimask_output=args.multimask)
    args.out.mkdir(parents=True, exist_ok=True)
    ids = list(range(1, len(result.masks) + 1))
    boxes = []
    for i, mask in zip(ids, result.masks, strict=True):
        Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / f"mask_{i:02d}.png")
        box = mask_box(mask)
        boxes.append(box)
        print(json.dumps({"object": i, "score": round(float(result.scores[i - 1]), 4),
                          "box": box, "mask": str(args.out / f"mask_{i:02d}.png")}))
    overlay = draw_overlay(image, result.masks, ids, boxes)
    Image.fromarray(overlay).save(args.out / "overlay.png")
    print(f"wrote {len(ids)} mask(s) and overlay.png to {args.out}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="segment a video: decoder, encoder, tracker and publisher nodes",
        description="Run the whole graph on a source. Each --box and each --point is one "
        "object to follow. Defaults come from CONFIG (YAML), then these options, then --set.",
    )
    p.add_argument("config", nargs="?", help="YAML config (e.g. configs/offline.yaml)")
    p.add_argument("--source", help="video file, lavfi:testsrc2=..., rtsp://..., /dev/video0")
    p.add_argument("--box", nargs=4, type=float, action="append", metavar=("X1", "Y1", "X2", "Y2"),
                   help="box around one object on the first frame (repeatable)")
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"),
                   help="a point on one object on the first frame (repeatable)")
    p.add_argument("--weights", help="mobile_sam.pt path")
    p.add_argument("--out", help="directory for masks/, masks.jsonl, tracks.txt, overlay.mp4")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 (encoder and tracker)")
    p.add_argument("--image-size", type=int, help="encoder input side (1024; 512 is faster)")
    p.add_argument("--realtime", action="store_true",
                   help="live mode for any source: play a file at its own frame rate, newest "
                   "frame wins (cameras are live anyway)")
    p.add_argument("--budget-ms", type=float,
                   help="per-frame processing budget in live mode (default 12 on a GPU, "
                   "400 on a CPU)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--set", action="append", default=[], metavar="NODE.KEY=VALUE",
                   help="override any config key, e.g. --set encoder.batch_size=2")
    p.add_argument("--in-process", action="store_true",
                   help="run every node as a thread of this process (inproc://)")
    p.set_defaults(func=_run)


def run_config_from_args(args: argparse.Namespace):
    """Config file, then the command-line options, then --set overrides (last wins)."""
    from pipeline.config import load_config

    overrides: list[str] = []
    if args.source is not None:
        overrides.append(f"decoder.source={json.dumps(args.source)}")
    if args.max_frames is not None:
        overrides.append(f"decoder.max_frames={args.max_frames}")
    if args.weights is not None:
        overrides.append(f"weights={json.dumps(args.weights)}")
    if args.out is not None:
        overrides.append(f"publisher.out={json.dumps(args.out)}")
    if args.device is not None:
        overrides += [f"encoder.device={args.device}", f"tracker.device={args.device}"]
    if args.image_size is not None:
        overrides.append(f"encoder.image_size={args.image_size}")
    if args.realtime:
        overrides.append("live.mode=live")
    if args.budget_ms is not None:
        overrides.append(f"live.budget_ms={args.budget_ms}")
    prompts = [{"box": box} for box in args.box or []]
    prompts += [{"points": [point], "labels": [1]} for point in args.point or []]
    if prompts:
        overrides.append(f"tracker.prompts={json.dumps(prompts)}")
    return load_config(args.config, [*overrides, *args.set])


def _run(args: argparse.Namespace) -> int:
    from pipeline.launcher import run_pipeline
    from pipeline.runtime import install_signal_handlers

    config = run_config_from_args(args)
    if not config.tracker.prompts:
        log.warning("no --box or --point given: add objects with `samstream prompt add`")
    install_signal_handlers()
    summary = run_pipeline(config, in_process=args.in_process, progress=sys.stderr.isatty())
    print(summary.format())
    if summary.stopped_by:
        print(f"samstream: stopped by {summary.stopped_by}", file=sys.stderr)
        return 130 if summary.stopped_by == "SIGINT" else 143
    return 0


def _add_node(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="run one node alone (e.g. on another host over tcp)")
    p.add_argument("name", choices=("decoder", "encoder", "tracker", "publisher"))
    p.add_argument("--config", required=True, help="YAML or JSON config with explicit endpoints")
    p.add_argument("--set", action="append", default=[], metavar="NODE.KEY=VALUE")
    p.set_defaults(func=_node)


def _node(args: argparse.Namespace) -> int:
    import zmq

    from pipeline.config import load_config
    from pipeline.launcher import node_runner
    from pipeline.runtime import install_signal_handlers

    config = load_config(args.config, args.set)
    install_signal_handlers()
    code = node_runner(args.name, config).run()
    # Wait here, explicitly, until queued output has been delivered (sockets linger).
    zmq.Context.instance().term()
    return code


def _add_prompt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompt", help="add, correct, remove or list objects of a running tracker")
    p.add_argument("op", choices=("add", "update", "remove", "list"))
    p.add_argument("--endpoint", required=True, help="the tracker's control endpoint")
    p.add_argument("--id", type=int, dest="track_id", help="track id (update, remove)")
    p.add_argument("--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"))
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"))
    p.add_argument("--label", type=int, action="append", choices=(0, 1))
    p.add_argument("--frame", type=int, help="apply from this frame index (default: next)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    p.set_defaults(func=_prompt)


def _prompt(args: argparse.Namespace) -> int:
    from pipeline.control import send_prompt
    from pipeline.messages import PromptCommand

    labels = None
    if args.point:
        labels = tuple(args.label or [1] * len(args.point))
    command = PromptCommand(
        op=args.op,
        track_id=args.track_id,
        box=tuple(args.box) if args.box else None,
        points=tuple(tuple(p) for p in args.point) if args.point else None,
        labels=labels,
        frame=args.frame,
    )
    reply = send_prompt(args.endpoint, command, timeout_s=args.timeout)
    print(reply.to_json().decode())
    if not reply.ok:
        print(f"samstream: error: {reply.error}", file=sys.stderr)
        return 1
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="timings of every stage beside the official code's")
    p.add_argument("--weights", default="mobile_sam.pt", help="mobile_sam.pt path")
    p.add_argument("--source", default=None, help="video (default: a 1280x720 FFmpeg test source)")
    p.add_argument("--frames", type=int, default=20, help="frames to run end to end")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--live-seconds", type=float, default=10.0,
                   help="seconds of the source played live for the latency figures (0: skip)")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pipeline.bench import DEFAULT_SOURCE, format_results, run_bench

    results = run_bench(weights=args.weights, source=args.source or DEFAULT_SOURCE,
                        frames=args.frames, device=args.device, dtype=args.dtype,
                        image_size=args.image_size, live_seconds=args.live_seconds)
    print(format_results(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samstream", description="Streaming video segmentation with MobileSAM."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    _add_run(sub)
    _add_node(sub)
    _add_prompt(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        # User errors end with one clear line, not a traceback.
        print(f"samstream: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        from pipeline.runtime import Shutdown

        if isinstance(err, Shutdown):
            print("samstream: stopped", file=sys.stderr)
            return 143
        raise


if __name__ == "__main__":
    sys.exit(main())
