"""The `samstream` command line: predict (one image), run, node, prompt, keys, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.run.graph import NODE_NAMES

if TYPE_CHECKING:
    from pipeline.config import RunConfig

log = logging.getLogger("samstream")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one worth showing (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if not shown or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_prompt_options(
    p: argparse.ArgumentParser, *, box: str, point: str, repeat_box: bool = True
) -> None:
    """--box, --point and --label, read the same way by predict, run and prompt."""
    p.add_argument(
        "--box",
        nargs=4,
        type=float,
        metavar=("X1", "Y1", "X2", "Y2"),
        help=box,
        **({"action": "append"} if repeat_box else {}),
    )
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help=point)
    p.add_argument(
        "--label",
        type=int,
        action="append",
        choices=(0, 1),
        help="label of each --point in order: 1 foreground (default), 0 background",
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        formatter_class=_HelpWithDefaults,
        help="segment objects in one image",
        description="Segment the objects given by boxes and/or points in one image. All "
        "--point prompts belong to one object (with the --box, if there is one box).",
    )
    p.add_argument("image", help="image file (JPEG, PNG, ...)")
    _add_prompt_options(
        p, box="a box around one object (repeatable)", point="a point on the object (repeatable)"
    )
    p.add_argument(
        "--weights",
        default="mobile_sam.pt",
        help="mobile_sam.pt path (default: $SAMSTREAM_WEIGHTS, cache, download)",
    )
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1 ..."
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="encoder precision (reduced ones via autocast)",
    )
    p.add_argument("--image-size", type=int, default=1024, help="encoder input side")
    p.add_argument("--multimask", action="store_true", help="three masks per object")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from pipeline.predictor import SAM, load_image

    image = load_image(args.image)
    points = labels = None
    if args.point:
        # All points describe one object.
        points, labels = [args.point], [_point_labels(args.point, args.label)]
    if not args.box and not points:
        raise ValueError("give at least one --box or --point")
    model = SAM(args.weights, device=args.device, dtype=args.dtype, image_size=args.image_size)
    [result] = model(
        image, bboxes=args.box, points=points, labels=labels, multimask_output=args.multimask
    )
    args.out.mkdir(parents=True, exist_ok=True)
    objects = zip(result.masks.data, result.boxes.xyxy, result.scores, strict=True)
    for i, (mask, box, score) in enumerate(objects, start=1):
        mask_path = args.out / f"mask_{i:02d}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        record = {
            "object": i,
            "score": round(float(score), 4),
            "box": None if np.isnan(box).any() else [float(v) for v in box],
            "mask": str(mask_path),
        }
        print(json.dumps(record))
    result.save(args.out / "overlay.png")
    print(f"wrote {len(result)} mask(s) and overlay.png to {args.out}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        formatter_class=_HelpWithDefaults,
        help="segment a video: decoder, encoder, tracker and publisher nodes",
        description="Run the whole graph on a source. Each --box is one object to follow; "
        "the --point values are one more (or the box's, with one box). Defaults come from "
        "CONFIG (YAML; configs/offline.yaml documents every key), then these options, then "
        "--set.",
    )
    p.add_argument("config", nargs="?", help="YAML config (e.g. configs/offline.yaml)")
    p.add_argument(
        "--source",
        help="video file, lavfi:testsrc2=..., rtsp://..., /dev/video0 (default: decoder.source)",
    )
    _add_prompt_options(
        p,
        box="box around one object on the first frame (repeatable)",
        point="a point on the first frame (repeatable): all --point values describe "
        "one object, the same as the --box when there is exactly one box, as in "
        "samstream predict",
    )
    p.add_argument(
        "--weights",
        help="mobile_sam.pt path (default: weights in the config, "
        "$SAMSTREAM_WEIGHTS, the cache, else a download)",
    )
    p.add_argument(
        "--out",
        help="directory for masks/, masks.jsonl, tracks.txt, overlay.mp4 "
        "(default: none: publish on the feed only)",
    )
    p.add_argument(
        "--device",
        help="auto, cpu, cuda, cuda:1 for the encoder and the tracker "
        "(default: auto, the GPU when there is one)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="encoder input side, a multiple of 16; 512 "
        "is faster (default: 1024, or 512 in a live run on a CPU)",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="live mode for any source: play a file at its own frame rate, newest "
        "frame wins (cameras are live anyway)",
    )
    p.add_argument(
        "--budget-ms",
        type=float,
        help="per-frame processing budget in live mode (default 12 on a GPU, 400 on a CPU)",
    )
    p.add_argument(
        "--max-frames", type=int, help="stop after this many frames (default: the whole source)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.KEY=VALUE",
        help="override any config key, e.g. --set encoder.batch_size=2",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every node as a thread of this process (inproc://)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an offline run that was interrupted (Ctrl-C, SIGTERM) in "
        "--out, from its first missing frame; the same source, prompts and config "
        "are required",
    )
    p.set_defaults(func=_run)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Config file, then the command-line options, then --set overrides (last wins)."""
    from pipeline.config import Override, load_config, parse_set

    options = (
        ("--source", "decoder.source", args.source),
        ("--max-frames", "decoder.max_frames", args.max_frames),
        ("--weights", "weights", args.weights),
        ("--out", "publisher.out", args.out),
        ("--device", "encoder.device", args.device),
        ("--device", "tracker.device", args.device),
        ("--image-size", "encoder.image_size", args.image_size),
        ("--realtime", "live.mode", "live" if args.realtime else None),
        ("--budget-ms", "live.budget_ms", args.budget_ms),
        ("--resume", "resume.enabled", True if args.resume else None),
        ("--box/--point", "tracker.prompts", run_prompts(args.box, args.point, args.label)),
    )
    overrides = [
        Override(key, value, origin) for origin, key, value in options if value not in (None, [])
    ]
    return load_config(args.config, [*overrides, *map(parse_set, args.set)])


def _point_labels(points: list[list[float]] | None, labels: list[int] | None) -> list[int]:
    """One label per point: the --label values in order, the rest foreground."""
    points, labels = points or [], labels or []
    if len(labels) > len(points):
        raise ValueError(f"{len(labels)} --label values for {len(points)} --point values")
    return labels + [1] * (len(points) - len(labels))


def run_prompts(
    boxes: list[list[float]] | None,
    points: list[list[float]] | None,
    labels: list[int] | None,
) -> list[dict]:
    """`samstream run`'s objects, as `predict` reads the same options: each --box is one
    object; the --point values are one more object, or the box's when there is one box.
    (The config checks each box; preflight, that it lies on the first frame.)"""
    prompts: list[dict] = [{"box": box} for box in boxes or []]
    if not points:
        if labels:
            raise ValueError("--label was given without --point")
        return prompts
    group = {"points": points, "labels": _point_labels(points, labels)}
    if len(prompts) == 1:
        prompts[0].update(group)
    elif prompts:
        raise ValueError(
            f"{len(prompts)} --box values and --point values: points describe one object, so "
            "give them with one box, or alone (add more objects with samstream prompt add)"
        )
    else:
        prompts.append(group)
    return prompts


def _run(args: argparse.Namespace) -> int:
    from pipeline.run.launcher import run_pipeline
    from pipeline.run.runtime import install_signal_handlers

    config = run_config_from_args(args)
    if not config.tracker.prompts:  # an offline run refuses this (pipeline.run.preflight)
        log.warning("no --box or --point given: add objects with `samstream prompt add`")
    install_signal_handlers()
    summary = run_pipeline(config, in_process=args.in_process, progress=sys.stderr.isatty())
    print(summary.format())
    if summary.stopped_by:
        print(f"samstream: stopped by {summary.stopped_by}", file=sys.stderr)
        return 130 if summary.stopped_by == "SIGINT" else 143
    return 0


def _add_node(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node",
        formatter_class=_HelpWithDefaults,
        help="run one node alone (e.g. on another host over tcp)",
    )
    p.add_argument("name", choices=NODE_NAMES, help="which node to run")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--config", help="YAML or JSON config with explicit endpoints")
    how.add_argument(
        "--run-file",
        help="the launcher's: the run's config and this node's runtime (pipeline.run.handoff)",
    )
    how.add_argument(
        "--standby",
        type=int,
        metavar="FD",
        help="the launcher's spare: import what the node needs, say so on pipe FD, then read "
        "the --run-file path from stdin and run (a restart that skips the imports)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.KEY=VALUE",
        help="override any config key (repeatable)",
    )
    p.set_defaults(func=_node)


def _node(args: argparse.Namespace) -> int:
    import zmq

    from pipeline.config import load_config, parse_set
    from pipeline.run.graph import node_spec
    from pipeline.run.handoff import NodeRuntime, read_run_file
    from pipeline.run.runtime import install_signal_handlers
    from pipeline.run.supervisor import node_runner
    from pipeline.run.workers import die_with_launcher
    from pipeline.wire.curve import exposure_warnings

    if args.standby is not None:
        # A spare: its launcher is its parent. Should it die before the run file comes,
        # stdin closes and the wait ends.
        die_with_launcher(os.getppid())
        args.run_file = _standby(args.name, args.standby)
        if not args.run_file:
            return 0  # the launcher closed the pipe: not needed after all
    overrides = [parse_set(text) for text in args.set]
    if args.run_file:
        config, runtime = read_run_file(args.run_file)
        if overrides:
            raise ValueError("--set goes with --config: a run file is the launcher's")
    else:
        config, runtime = load_config(args.config, overrides), NodeRuntime()
        # Started by hand: the launcher warns of exposed endpoints otherwise.
        for warning in exposure_warnings(config.transport, node_spec(args.name).binds):
            print(f"samstream: warning: {warning}", file=sys.stderr)
    install_signal_handlers()
    die_with_launcher(runtime.launcher_pid)
    code = node_runner(args.name, config, runtime).run()
    # Wait here, explicitly, until queued output has been delivered (sockets linger).
    zmq.Context.instance().term()
    # Everything is written and closed: skip the interpreter's teardown, which took 1-2 s
    # with torch loaded (most of the 2 s a stopped node has before it is killed).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _standby(name: str, ready_fd: int) -> str:
    """A spare's wait: import the node's module and what its setup imports (``preload``:
    torch, timm and the backends come with them), say so on the launcher's pipe, then block
    until the launcher writes the run file's path on stdin. Returns that path ("" when stdin
    closes first)."""
    from pipeline.infer.backend import import_package
    from pipeline.run.graph import node_class

    for module in node_class(name).preload:
        with contextlib.suppress(ImportError):
            import_package(module)
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    return sys.stdin.readline().strip()


def _add_prompt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prompt",
        formatter_class=_HelpWithDefaults,
        help="add, correct, remove or list objects of a running tracker",
    )
    p.add_argument(
        "op",
        choices=("add", "update", "remove", "list"),
        help="add an object, correct one's box (also brings a lost one back), "
        "remove one, or list them",
    )
    p.add_argument("--endpoint", required=True, help="the tracker's control endpoint")
    p.add_argument("--id", type=int, dest="track_id", help="track id (update, remove; add: free)")
    _add_prompt_options(
        p,
        box="the object's box in source-frame pixels (add, update)",
        point="a point on the object (add; repeatable, all for one object)",
        repeat_box=False,
    )
    p.add_argument("--frame", type=int, help="add: start at this frame index (default: the next)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    p.add_argument(
        "--client-key",
        metavar="FILE",
        help="this client's CURVE key pair (NAME.key_secret from samstream keys), for a run "
        "with transport.curve keys; its public NAME.key must be in the run's allowed_clients",
    )
    p.add_argument(
        "--server-key",
        metavar="FILE",
        help="the run's public CURVE key (the .key beside its server_secret_key), with "
        "--client-key",
    )
    p.set_defaults(func=_prompt)


def _prompt(args: argparse.Namespace) -> int:
    from pipeline.wire.client import send_prompt
    from pipeline.wire.messages import PromptCommand

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
    reply = send_prompt(
        args.endpoint,
        command,
        timeout_s=args.timeout,
        client_key=args.client_key,
        server_key=args.server_key,
    )
    print(reply.to_json().decode())
    if not reply.ok:
        print(f"samstream: error: {reply.error}", file=sys.stderr)
        return 1
    return 0


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        formatter_class=_HelpWithDefaults,
        help="make a CURVE key pair for a tcp feed, its control socket or a client",
        description="Write a new CURVE key pair as zmq.auth certificates: OUT/NAME.key, the "
        "public key to give the other side, and OUT/NAME.key_secret (mode 0600), both keys, "
        "to keep. The run takes its pair as transport.curve.server_secret_key; a client's "
        "public NAME.key goes into the run's transport.curve.allowed_clients folder.",
    )
    p.add_argument("--out", type=Path, default=Path("keys"), help="directory for the two files")
    p.add_argument("--name", default="samstream", help="file name of the pair, before .key")
    p.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    p.set_defaults(func=_keys)


def _keys(args: argparse.Namespace) -> int:
    from pipeline.wire.curve import create_key_pair

    try:
        public, secret = create_key_pair(args.out, args.name, force=args.force)
    except FileExistsError as err:
        raise ValueError(str(err)) from None  # one line, as every user error
    print(f"public key: {public}")
    print(f"secret key: {secret} (mode 0600: keep it, never share it)")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        formatter_class=_HelpWithDefaults,
        help="timings of every stage beside the official code's",
    )
    p.add_argument("--weights", default="mobile_sam.pt", help="mobile_sam.pt path")
    p.add_argument("--source", default=None, help="video (default: a 1280x720 FFmpeg test source)")
    p.add_argument(
        "--frames", type=int, default=20, help="frames of the official loops (and Ultralytics)"
    )
    p.add_argument(
        "--run-frames",
        type=int,
        default=60,
        help="frames of the samstream run: enough for its steady rate after the start",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="encoder precision of the runs (auto: the fastest measured within tolerance)",
    )
    p.add_argument("--image-size", type=int, default=1024, help="encoder input side")
    p.add_argument(
        "--encoder-sizes",
        default="1024,512",
        help="image sizes of the encoder table (every backend x precision), "
        "comma-separated; empty: skip it",
    )
    p.add_argument(
        "--live-seconds",
        type=float,
        default=10.0,
        help="seconds of the source played live for the latency figures (0: skip)",
    )
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pipeline.bench import DEFAULT_SOURCE, format_results, run_bench

    results = run_bench(
        weights=args.weights,
        source=args.source or DEFAULT_SOURCE,
        frames=args.frames,
        device=args.device,
        dtype=args.dtype,
        image_size=args.image_size,
        live_seconds=args.live_seconds,
        encoder_sizes=tuple(int(v) for v in args.encoder_sizes.split(",") if v),
        run_frames=args.run_frames,
    )
    print(format_results(results))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        formatter_class=_HelpWithDefaults,
        help="write the image encoder and the mask decoder as ONNX models",
        description="Export MobileSAM to ONNX: mobile_sam_image_encoder_S.onnx (images "
        "Bx3xSxS float32, normalised with SAM's mean/std and zero-padded, -> embeddings "
        "Bx256x(S/16)x(S/16)) and mobile_sam_mask_decoder_S.onnx (one embedding, N prompts "
        "as points with labels 1/0, box corners 2/3, padding -1, an optional mask prompt -> "
        "low-res logits Nx1x(S/4)x(S/4) and scores Nx1), each with a JSON sidecar.",
    )
    p.add_argument(
        "--weights",
        default="mobile_sam.pt",
        help="mobile_sam.pt path (default: $SAMSTREAM_WEIGHTS, cache, download)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=1024,
        help="encoder input side, a multiple of 16 (fixed per exported file)",
    )
    p.add_argument("--out", type=Path, default=Path("onnx"), help="output directory")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from pipeline.infer.export import export_models, file_sha256
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.model.sam import build_mobile_sam
    from pipeline.model.weights import resolve_weights

    if args.image_size <= 0 or args.image_size % 16:
        raise ValueError(f"--image-size must be a positive multiple of 16, got {args.image_size}")
    weights = resolve_weights(args.weights)
    model = build_mobile_sam(img_size=args.image_size)
    load_checkpoint(model, weights)
    paths = export_models(
        model.eval(), args.out, checkpoint_sha256=file_sha256(weights), opset=args.opset
    )
    for path in paths.values():
        print(f"wrote {path} and {path.with_suffix('.json').name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samstream", description="Streaming video segmentation with MobileSAM."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_run, _add_node, _add_prompt, _add_keys, _add_bench, _add_export):
        add(sub)  # in this order: the order of --help's list of commands
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
        from pipeline.run.runtime import Shutdown

        if isinstance(err, Shutdown):
            print("samstream: stopped", file=sys.stderr)
            return 143
        raise


if __name__ == "__main__":
    sys.exit(main())
