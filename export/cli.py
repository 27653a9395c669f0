"""`k3trt export` and `k3trt preset`: argument parsing only; the work is imported when a command runs."""
from __future__ import annotations

import json
import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_source_args(parser, *, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--model", metavar="DIR", help="Kandinsky 3 folder: diffusers layout (save_pretrained) or the official "
                       ".pt layout (ai-forever/Kandinsky3.1 weights/)")
    group.add_argument("--preset", choices=["tiny", "small"], help="random-weight preset of the real classes")
    parser.add_argument("--variant", choices=["fp16"], default=None,
                        help="load *.fp16.safetensors files (auto-detected when they are the only ones)")
    parser.add_argument("--seed", type=int, default=0, help="preset weight seed (default 0)")
    parser.add_argument("--undamped", action="store_true",
                        help="preset: keep raw random init instead of damped residual branches")


def open_source(args):
    from .sources import open_source_dir, preset_source

    if args.preset:
        return preset_source(args.preset, seed=args.seed, damped=not args.undamped, log=log)
    return open_source_dir(args.model, variant=args.variant)


def cmd_export(args) -> int:
    from .onnx_export import PROTOBUF_LIMIT
    from .variants import parse_precisions
    from .writer import default_components, export_artifacts

    precisions = parse_precisions(args.precision)
    source = open_source(args)
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else \
        default_components(source)
    log(f"exporting {', '.join(components)} from {source.label} -> {args.out}")
    threshold = int(args.external_data_threshold_mb * 1024 * 1024) if args.external_data_threshold_mb is not None else \
        PROTOBUF_LIMIT
    summary = export_artifacts(source, args.out, components=components, opset=args.opset,
                               external_threshold=threshold, force=args.force, precisions=precisions, log=log)
    log(f"done: exported {summary['exported'] or 'nothing'}; variants {summary.get('variants') or 'none new'}; "
        f"up to date {summary['up_to_date'] or 'none'}; "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB; manifest {args.out}/manifest.json")
    return 0


def cmd_preset(args) -> int:
    from .presets import describe_full, write_preset

    if args.describe or args.name == "full":
        if args.name != "full":
            log("--describe is for the weightless `full` preset; tiny/small are written with --out")
        print(json.dumps(describe_full(), indent=2))
        return 0
    if not args.out:
        log("error: --out DIR is required to write a preset")
        return 2
    path = write_preset(args.name, args.out, seed=args.seed, damped=not args.undamped)
    log(f"wrote preset {args.name} to {path} (diffusers layout; load with Kandinsky3Pipeline.from_pretrained)")
    return 0


def register(sub) -> None:
    from .components import SPECS
    from .onnx_export import DEFAULT_OPSET

    p = sub.add_parser("export", help="export Kandinsky 3 components to validated ONNX + manifest")
    add_source_args(p)
    p.add_argument("--out", required=True, metavar="ART", help="artifact directory (created or updated)")
    p.add_argument("--components", default=None, help=f"comma list of {', '.join(SPECS)} (default: every "
                   "component whose weights the model has)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--external-data-threshold-mb", type=float, default=None,
                   help="store weights as external data past this size (default: the 2 GB protobuf limit)")
    p.add_argument("--force", action="store_true", help="re-export even if inputs are unchanged")
    p.add_argument("--precision", default=None, metavar="P[,P]",
                   help="also write reduced-precision ONNX variants: fp16, bf16 or fp16,bf16 (fp32 is always "
                        "exported; the card of each component says which nodes stay fp32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("preset", help="write a random-weight preset in the diffusers layout, or describe `full`")
    p.add_argument("name", choices=["tiny", "small", "full"])
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--undamped", action="store_true")
    p.add_argument("--describe", action="store_true", help="print parameter counts and sizes")
    p.set_defaults(func=cmd_preset)
