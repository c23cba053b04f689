"""The `samstream` command line: predict (one image), run, node, prompt, keys, bench, export.

Each subcommand is declared by `@_command` over the function that runs it."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


Handler = Callable[[argparse.Namespace], int]  # a subcommand: its exit status
Adder = Callable[[argparse._ActionsContainer], object]  # adds an argument to a parser or group
_COMMANDS: list[tuple[str, dict[str, str], tuple[Adder, ...], Handler]] = []


def _command(name: str, *arguments: Adder, **parser_text: str) -> Callable[[Handler], Handler]:
    """Declares the subcommand ``name`` (its ``help``, ``description`` and arguments) over the
    function that runs it; the commands are listed in --help in the order of this file."""

    def register(run: Handler) -> Handler:
        _COMMANDS.append((name, parser_text, arguments, run))
        return run

    return register


def _arg(*flags: str, **options: Any) -> Adder:
    """An argument as ``parser.add_argument(*flags, **options)`` adds it."""
    return lambda parser: parser.add_argument(*flags, **options)


def _one_of(*arguments: Adder) -> Adder:
    """Exactly one of these arguments is given."""

    def add(parser: argparse._ActionsContainer) -> None:
        group = parser.add_mutually_exclusive_group(required=True)
        for add_argument in arguments:
            add_argument(group)

    return add


def _prompt_options(*, box: str, point: str, repeat_box: bool = True) -> tuple[Adder, ...]:
    """--box, --point and --label, read the same way by predict, run and prompt."""
    return (
        _arg(
            "--box",
            nargs=4,
            type=float,
            metavar=("X1", "Y1", "X2", "Y2"),
            help=box,
            **({"action": "append"} if repeat_box else {}),
        ),
        _arg("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help=point),
        _arg(
            "--label",
            type=int,
            action="append",
            choices=(0, 1),
            help="label of each --point in order: 1 foreground (default), 0 background",
        ),
    )


_WEIGHTS = _arg(
    "--weights",
    default="mobile_sam.pt",
    help="mobile_sam.pt path (default: $SAMSTREAM_WEIGHTS, cache, download)",
)
_IMAGE_SIZE = _arg(
    "--image-size", type=int, default=1024, help="encoder input side, a multiple of 16"
)
_SET = _arg(
    "--set",
    action="append",
    default=[],
    metavar="NODE.KEY=VALUE",
    help="override any config key (repeatable), e.g. --set encoder.batch_size=2",
)


def _point_labels(points: list[list[float]] | None, labels: list[int] | None) -> list[int] | None:
    """One label per --point: the --label values in order, the rest foreground; None
    without points."""
    points, labels = points or [], labels or []
    if len(labels) > len(points):
        raise ValueError(f"{len(labels)} --label values for {len(points)} --point values")
    return labels + [1] * (len(points) - len(labels)) if points else None


@_command(
    "predict",
    _arg("image", help="image file (JPEG, PNG, ...)"),
    *_prompt_options(
        box="a box around one object (repeatable)", point="a point on the object (repeatable)"
    ),
    _WEIGHTS,
    _arg("--out", type=Path, default=Path("out"), help="output directory"),
    _arg("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1 ..."),
    _arg(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="encoder precision (reduced ones via autocast)",
    ),
    _IMAGE_SIZE,
    _arg("--multimask", action="store_true", help="three masks per object"),
    help="segment objects in one image",
    description="Segment the objects given by boxes and/or points in one image. All "
    "--point prompts belong to one object (with the --box, if there is one box).",
)
def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from pipeline.predictor import SAM, load_image

    image = load_image(args.image)
    labels = _point_labels(args.point, args.label)
    if not args.box and not args.point:
        raise ValueError("give at least one --box or --point")
    model = SAM(args.weights, device=args.device, dtype=args.dtype, image_size=args.image_size)
    [result] = model(
        image,
        bboxes=args.box,
        # All points describe one object: one group of points.
        points=[args.point] if args.point else None,
        labels=[labels] if labels else None,
        multimask_output=args.multimask,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    objects = zip(result.masks.data, result.box_list(), result.scores, strict=True)
    for i, (mask, box, score) in enumerate(objects, start=1):
        mask_path = args.out / f"mask_{i:02d}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        record = {"object": i, "score": round(float(score), 4), "box": box, "mask": str(mask_path)}
        print(json.dumps(record))
    result.save(args.out / "overlay.png")
    print(f"wrote {len(result)} mask(s) and overlay.png to {args.out}")
    return 0


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


def run_prompts(
    boxes: list[list[float]] | None,
    points: list[list[float]] | None,
    labels: list[int] | None,
) -> list[dict]:
    """`samstream run`'s objects, as `predict` reads the same options: each --box is one
    object; the --point values are one more object, or the box's when there is one box.
    (The config checks each box; preflight, that it lies on the first frame.)"""
    prompts: list[dict] = [{"box": box} for box in boxes or []]
    labels = _point_labels(points, labels)
    if not points:
        return prompts
    if len(prompts) > 1:
        raise ValueError(
            f"{len(prompts)} --box values and --point values: points describe one object, so "
            "give them with one box, or alone (add more objects with samstream prompt add)"
        )
    box = prompts[0] if prompts else {}
    return [{**box, "points": points, "labels": labels}]


@_command(
    "run",
    _arg("config", nargs="?", help="YAML config (e.g. configs/offline.yaml)"),
    _arg(
        "--source",
        help="video file, lavfi:testsrc2=..., rtsp://..., /dev/video0 (default: decoder.source)",
    ),
    *_prompt_options(
        box="box around one object on the first frame (repeatable)",
        point="a point on the first frame (repeatable): all --point values describe "
        "one object, the same as the --box when there is exactly one box, as in "
        "samstream predict",
    ),
    _arg(
        "--weights",
        help="mobile_sam.pt path (default: weights in the config, "
        "$SAMSTREAM_WEIGHTS, the cache, else a download)",
    ),
    _arg(
        "--out",
        help="directory for masks/, masks.jsonl, tracks.txt, overlay.mp4 "
        "(default: none: publish on the feed only)",
    ),
    _arg(
        "--device",
        help="auto, cpu, cuda, cuda:1 for the encoder and the tracker "
        "(default: auto, the GPU when there is one)",
    ),
    _arg(
        "--image-size",
        type=int,
        help="encoder input side, a multiple of 16; 512 "
        "is faster (default: 1024, or 512 in a live run on a CPU)",
    ),
    _arg(
        "--realtime",
        action="store_true",
        help="live mode for any source: play a file at its own frame rate, newest "
        "frame wins (cameras are live anyway)",
    ),
    _arg(
        "--budget-ms",
        type=float,
        help="per-frame processing budget in live mode (default 12 on a GPU, 400 on a CPU)",
    ),
    _arg("--max-frames", type=int, help="stop after this many frames (default: the whole source)"),
    _SET,
    _arg(
        "--in-process",
        action="store_true",
        help="run every node as a thread of this process (inproc://)",
    ),
    _arg(
        "--resume",
        action="store_true",
        help="continue an offline run that was interrupted (Ctrl-C, SIGTERM) in "
        "--out, from its first missing frame; the same source, prompts and config "
        "are required",
    ),
    help="segment a video: decoder, encoder, tracker and publisher nodes",
    description="Run the whole graph on a source. Each --box is one object to follow; "
    "the --point values are one more (or the box's, with one box). Defaults come from "
    "CONFIG (YAML; configs/offline.yaml documents every key), then these options, then "
    "--set.",
)
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


@_command(
    "node",
    _arg("name", choices=NODE_NAMES, help="which node to run"),
    _one_of(
        _arg("--config", help="YAML or JSON config with explicit endpoints"),
        _arg(
            "--run-file",
            help="the launcher's: the run's config and this node's runtime (pipeline.run.handoff)",
        ),
        _arg(
            "--standby",
            type=int,
            metavar="FD",
            help="the launcher's spare: import what the node needs, say so on pipe FD, then "
            "read the --run-file path from stdin and run (a restart that skips the imports)",
        ),
    ),
    _SET,
    help="run one node alone (e.g. on another host over tcp)",
)
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


@_command(
    "prompt",
    _arg(
        "op",
        choices=("add", "update", "remove", "list"),
        help="add an object, correct one's box (also brings a lost one back), "
        "remove one, or list them",
    ),
    _arg("--endpoint", required=True, help="the tracker's control endpoint"),
    _arg("--id", type=int, dest="track_id", help="track id (update, remove; add: free)"),
    *_prompt_options(
        box="the object's box in source-frame pixels (add, update)",
        point="a point on the object (add; repeatable, all for one object)",
        repeat_box=False,
    ),
    _arg("--frame", type=int, help="add: start at this frame index (default: the next)"),
    _arg("--timeout", type=float, default=5.0, help="seconds to wait for the reply"),
    _arg(
        "--client-key",
        metavar="FILE",
        help="this client's CURVE key pair (NAME.key_secret from samstream keys), for a run "
        "with transport.curve keys; its public NAME.key must be in the run's allowed_clients",
    ),
    _arg(
        "--server-key",
        metavar="FILE",
        help="the run's public CURVE key (the .key beside its server_secret_key), with "
        "--client-key",
    ),
    help="add, correct, remove or list objects of a running tracker",
)
def _prompt(args: argparse.Namespace) -> int:
    from pipeline.wire.client import send_prompt
    from pipeline.wire.messages import PromptCommand

    labels = _point_labels(args.point, args.label)
    command = PromptCommand(
        op=args.op,
        track_id=args.track_id,
        box=tuple(args.box) if args.box else None,
        points=tuple(tuple(p) for p in args.point) if args.point else None,
        labels=tuple(labels) if labels else None,
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


@_command(
    "keys",
    _arg("--out", type=Path, default=Path("keys"), help="directory for the two files"),
    _arg("--name", default="samstream", help="file name of the pair, before .key"),
    _arg("--force", action="store_true", help="replace an existing pair of that name"),
    help="make a CURVE key pair for a tcp feed, its control socket or a client",
    description="Write a new CURVE key pair as zmq.auth certificates: OUT/NAME.key, the "
    "public key to give the other side, and OUT/NAME.key_secret (mode 0600), both keys, "
    "to keep. The run takes its pair as transport.curve.server_secret_key; a client's "
    "public NAME.key goes into the run's transport.curve.allowed_clients folder.",
)
def _keys(args: argparse.Namespace) -> int:
    from pipeline.wire.curve import create_key_pair

    public, secret = create_key_pair(args.out, args.name, force=args.force)
    print(f"public key: {public}")
    print(f"secret key: {secret} (mode 0600: keep it, never share it)")
    return 0


@_command(
    "bench",
    _WEIGHTS,
    _arg("--source", default=None, help="video (default: a 1280x720 FFmpeg test source)"),
    _arg("--frames", type=int, default=20, help="frames of the official loops (and Ultralytics)"),
    _arg(
        "--run-frames",
        type=int,
        default=60,
        help="frames of the samstream run: enough for its steady rate after the start",
    ),
    _arg("--device", default="cpu", help="cpu, cuda, cuda:1 ..."),
    _arg(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="encoder precision of the runs (auto: the fastest measured within tolerance)",
    ),
    _IMAGE_SIZE,
    _arg(
        "--encoder-sizes",
        default="1024,512",
        help="image sizes of the encoder table (every backend x precision), "
        "comma-separated; empty: skip it",
    ),
    _arg(
        "--live-seconds",
        type=float,
        default=10.0,
        help="seconds of the source played live for the latency figures (0: skip)",
    ),
    help="timings of every stage beside the official code's",
)
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


@_command(
    "export",
    _WEIGHTS,
    _IMAGE_SIZE,
    _arg("--out", type=Path, default=Path("onnx"), help="output directory"),
    _arg("--opset", type=int, default=17, help="ONNX opset"),
    help="write the image encoder and the mask decoder as ONNX models",
    description="Export MobileSAM to ONNX: mobile_sam_image_encoder_S.onnx (images "
    "Bx3xSxS float32, normalised with SAM's mean/std and zero-padded, -> embeddings "
    "Bx256x(S/16)x(S/16)) and mobile_sam_mask_decoder_S.onnx (one embedding, N prompts "
    "as points with labels 1/0, box corners 2/3, padding -1, an optional mask prompt -> "
    "low-res logits Nx1x(S/4)x(S/4) and scores Nx1), each with a JSON sidecar.",
)
def _export(args: argparse.Namespace) -> int:
    from pipeline.infer.export import export_models, file_sha256
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.model.sam import build_mobile_sam
    from pipeline.model.weights import resolve_weights

    model = build_mobile_sam(img_size=args.image_size)  # checks the size before a download
    weights = resolve_weights(args.weights)
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
    for name, text, arguments, run in _COMMANDS:
        command = sub.add_parser(name, formatter_class=_HelpWithDefaults, **text)
        for add_argument in arguments:
            add_argument(command)
        command.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TimeoutError) as err:
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
