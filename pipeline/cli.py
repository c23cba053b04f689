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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samstream", description="Streaming video segmentation with MobileSAM."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # User errors end with one clear line, not a traceback.
        print(f"samstream: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
