"""`k3trt export` and `k3trt preset`: argument parsing only; the work is imported when a command runs."""
from __future__ import annotations

import json
import sys

from k3trt.contract.arguments import check_float, check_seed
from k3trt.contract.cards import COMPONENTS
from k3trt.contract.errors import InvalidArgumentError
from k3trt.export.onnx_settings import DEFAULT_OPSET


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_source_args(parser, *, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--model", metavar="DIR", help="Kandinsky 3 folder: diffusers layout (save_pretrained) or the official "
                       ".pt layout (ai-forever/Kandinsky3.1 weights/)")
    group.add_argument("--preset", choices=["tiny", "small"], help="random-weight preset of the real classes")
    parser.add_argument("--variant", choices=["fp16"], default=None,
                        help="load *.fp16.safetensors files (auto-detected when they are the only ones)")
    parser.add_argument("--seed", type=int, default=0, help="preset weight seed, 0..2^64-1")
    parser.add_argument("--undamped", action="store_true",
                        help="preset: keep raw random init instead of damped residual branches")


def open_source(args):
    from k3trt.export.sources import open_source_dir, preset_source

    if args.preset:
        return preset_source(args.preset, seed=args.seed, damped=not args.undamped, log=log)
    return open_source_dir(args.model, variant=args.variant)


def cmd_export(args) -> int:
    from k3trt.export.onnx_export import PROTOBUF_LIMIT
    from k3trt.export.precision_variants import parse_precisions
    from k3trt.export.writer import export_artifacts, resolve_components

    precisions = parse_precisions(args.precision)
    from k3trt.export.writer import check_export_request

    threshold = PROTOBUF_LIMIT
    if args.external_data_threshold_mb is not None:
        mb = check_float("--external-data-threshold-mb", args.external_data_threshold_mb, 0, PROTOBUF_LIMIT / 2**20)
        threshold = int(mb * 1024 * 1024)
    check_seed(args.seed, "--seed")
    if args.low_memory and args.preset:
        raise InvalidArgumentError(f"--low-memory with --preset {args.preset}: presets are built in memory, and "
                                   "streaming needs weights on disk", accepted="--low-memory with --model DIR (a "
                                   "diffusers-layout folder with safetensors weights)",
                                   fix=f"drop --low-memory (presets are small), or write the preset with `k3trt "
                                       f"preset {args.preset} --out DIR` and pass --model DIR")
    components = check_export_request(args.out, components=args.components, opset=args.opset,
                                      external_threshold=threshold, source_root=args.model)  # before any work
    source = open_source(args)
    components = resolve_components(source, components, low_memory=args.low_memory, precisions=precisions, log=log)
    log(f"exporting {', '.join(components)} from {source.label} -> {args.out}"
        f"{' (low memory: U-Net and text encoder streamed)' if args.low_memory else ''}")
    summary = export_artifacts(source, args.out, components=components, opset=args.opset,
                               external_threshold=threshold, force=args.force, precisions=precisions,
                               low_memory=args.low_memory, log=log)
    log(f"done: exported {summary['exported'] or 'nothing'}; variants {summary.get('variants') or 'none new'}; "
        f"up to date {summary['up_to_date'] or 'none'}; "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB; manifest {args.out}/manifest.json")
    return 0


def cmd_preset(args) -> int:
    from k3trt.export.presets import describe_full, write_preset

    if args.describe or args.name == "full":
        if args.name != "full":
            log("--describe is for the weightless `full` preset; tiny/small are written with --out")
        print(json.dumps(describe_full(), indent=2))
        return 0
    if not args.out:
        raise InvalidArgumentError(f"preset {args.name} needs --out DIR", fix=f"k3trt preset {args.name} --out DIR")
    path = write_preset(args.name, args.out, seed=args.seed, damped=not args.undamped, force=args.force)
    log(f"wrote preset {args.name} to {path} (diffusers layout; load with Kandinsky3Pipeline.from_pretrained)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export Kandinsky 3 components to validated ONNX + manifest")
    add_source_args(p)
    p.add_argument("--out", required=True, metavar="ART",
                   help="artifact directory: new, empty, or artifacts k3trt wrote (updated in place); never the "
                        "model folder")
    p.add_argument("--components", default=None, help=f"comma list of {', '.join(COMPONENTS)} (default: every "
                   "component whose weights the model has)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, 17..20")
    p.add_argument("--external-data-threshold-mb", type=float, default=None,
                   help="store weights as external data past this size (default: the 2 GB protobuf limit)")
    p.add_argument("--force", action="store_true", help="re-export even if inputs are unchanged (never replaces a "
                   "folder k3trt did not write)")
    p.add_argument("--precision", default=None, metavar="P[,P]",
                   help="also write reduced-precision ONNX variants: fp16, bf16 or fp16,bf16 (fp32 is always "
                        "exported; the card of each component says which nodes stay fp32)")
    p.add_argument("--low-memory", action="store_true",
                   help="for a full-size checkpoint on a machine that cannot hold it in fp32: the U-Net and text "
                        "encoder are never loaded; their graph is traced without weights, the weights are streamed "
                        "one tensor at a time from the safetensors into external data (fp32), and the result is "
                        "validated against the fp32 torch computation with one layer's weights in memory "
                        "(full-size export measured at 1.7 GB peak RSS for the U-Net, 2.1 GB for the text encoder; "
                        "the disk must hold their fp32 data, 12.2 and 34.9 GB). The MoVQ takes the regular path; "
                        "unet_inpainting/unet_flash are refused. Needs --model with a diffusers-layout folder; not "
                        "with --preset or --precision")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("preset", help="write a random-weight preset in the diffusers layout, or describe `full`")
    p.add_argument("name", choices=["tiny", "small", "full"], help="tiny (tests), small (CPU benchmarks), "
                   "full (the real configuration, --describe only)")
    p.add_argument("--out", metavar="DIR", help="folder to write: new, empty, or a preset k3trt wrote (with --force); "
                   "needed for tiny and small")
    p.add_argument("--seed", type=int, default=0, help="weight seed, 0..2^64-1")
    p.add_argument("--undamped", action="store_true", help="keep raw random init instead of damped residual branches")
    p.add_argument("--force", action="store_true", help="replace --out if it holds a preset k3trt wrote "
                   "(never any other folder)")
    p.add_argument("--describe", action="store_true", help="print parameter counts and sizes")
    p.set_defaults(func=cmd_preset)
