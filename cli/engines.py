"""`k3trt build`, `check`, `refit`, `selftest`: argument parsing only; the work is imported when a command runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from k3trt.contract.arguments import (
    check_float,
    check_int,
    check_path,
    parse_list,
    writable_ancestor,
)
from k3trt.contract.cards import COMPONENTS
from k3trt.contract.errors import OutputPathError
from k3trt.contract.manifest import Manifest
from k3trt.contract.precision import Precision
from k3trt.writing.locking import artifact_lock
from k3trt.writing.ownership import check_output_json, claim_output_dir, save_json


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_build_args(args) -> None:
    """Resource and output arguments, before the manifest is read or anything is planned."""

    if args.workspace is not None:
        check_float("--workspace", args.workspace, 1 / 1024, 4096, "GB of GPU memory for the builder, e.g. 8")
    if args.builder_optimization_level is not None:
        check_int("--builder-optimization-level", args.builder_optimization_level, 0, 5, "3 is TensorRT's default")
    if args.components is not None:
        args.components = ",".join(parse_list("--components", args.components, COMPONENTS))
    if args.json:
        check_output_json(args.json, "--json")
    if args.timing_cache:
        cache = check_path("--timing-cache", args.timing_cache)

        if cache.is_dir():
            raise OutputPathError(f"--timing-cache {str(cache)!r} is a folder", accepted="a file path")
        if cache.suffix != ".cache":  # it is rewritten after the build: never a file of another kind
            raise OutputPathError(f"--timing-cache {str(cache)!r} does not end in .cache",
                                  accepted="FILE.cache: TensorRT's timing cache, loaded if it exists, then updated",
                                  fix=f"e.g. --timing-cache {cache.with_suffix('.cache').name}")
        writable_ancestor(cache, "--timing-cache")


def cmd_build(args) -> int:
    from k3trt.engines.plan import BuildFlags, make_plan

    check_build_args(args)
    manifest = Manifest.load(args.artifacts)
    if not args.dry_run:  # TensorRT and a GPU before any work (variant conversion included)
        from k3trt.runtime.tensorrt_env import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda()
    flags = BuildFlags(timing_cache=args.timing_cache, refittable=args.refittable,
                       builder_optimization_level=args.builder_optimization_level, workspace_gb=args.workspace,
                       force=args.force)
    plan = make_plan(manifest, precision=args.precision, component_precision=args.component_precision,
                     components=args.components, resolutions=args.resolution, batch=args.batch, static=args.static,
                     guidance=not args.no_guidance, flags=flags, create_variants=not args.dry_run, log=log)
    for cp in plan.components:
        axes = ", ".join(f"{n} {r.min}" + (f"..{r.max} (opt {r.opt})" if not r.static else "")
                         for n, r in cp.profile.axes)
        source = f"{cp.precision.variant} ONNX" + (" (converted at build time)" if cp.pending else "")
        log(f"  {cp.name}: strongly typed from the {source}{', tf32' if cp.precision.tf32 else ''}; "
            f"{len(cp.fp32_nodes)} nodes kept fp32; {axes}")
    if args.json:
        save_json(plan.to_dict(), Path(args.json))
        log(f"plan written to {args.json}")
    if args.dry_run:
        if not args.json:
            print(json.dumps(plan.to_dict(), indent=2))
        log("dry run: nothing built")
        return 0
    from k3trt.engines.build import build_engines

    with artifact_lock(manifest.root, log):  # one writer per artifact directory
        summary = build_engines(plan, manifest, log=log)
    log(f"done: built {summary['built'] or 'nothing'}; up to date {summary['up_to_date'] or 'none'}; "
        f"manifest {manifest.root / 'manifest.json'}")
    return 0


def cmd_check(args) -> int:
    from k3trt.engines.check import (
        check_artifacts,
        check_onnx_file,
        format_results,
        parse_trt_version,
    )

    version = parse_trt_version(args.trt_version)
    results = (check_artifacts(args.artifacts, trt_version=version) if args.artifacts is not None
               else [check_onnx_file(args.onnx, trt_version=version)])
    print(format_results(results, version))
    return 1 if any(r.errors for r in results) else 0


def cmd_refit(args) -> int:
    from k3trt.engines.refit import refit_artifacts


    components = parse_list("--components", args.components, COMPONENTS) if args.components is not None else None

    root = Manifest.load(args.artifacts).root
    with artifact_lock(root, log):  # one writer per artifact directory
        done = refit_artifacts(args.artifacts, args.model, components=components, variant=args.variant, log=log)
    log(f"done: refit {', '.join(done)}")
    return 0


def cmd_selftest(args) -> int:
    from k3trt.engines.selftest import run_selftest


    precisions = (parse_list("--precisions", args.precisions, [p.value for p in Precision])
                  if args.precisions is not None else None)
    if args.keep:  # a folder of its own: new, empty, or an earlier self-test's
        args.keep = str(claim_output_dir(args.keep, "selftest", name="--keep"))
    return run_selftest(gpu=args.gpu, precisions=precisions, keep=args.keep, log=log)


def register(sub) -> None:
    names = [p.value for p in Precision]
    p = sub.add_parser("build", help="build TensorRT engines from the artifact directory's ONNX")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--precision", choices=names, default=None,
                   help="one precision for every component: picks the ONNX variant each engine is parsed from "
                        "(strongly typed; a missing fp16/bf16 variant is converted first). Default: each card's "
                        "(bf16 text encoder, fp16 U-Net and MoVQ)")
    p.add_argument("--component-precision", metavar="C=P,...", default=None,
                   help="per-component override, e.g. text_encoder=bf16,unet=fp16,movq_decoder=fp16")
    p.add_argument("--components", default=None, help="comma list (default: every exported component)")
    p.add_argument("--resolution", nargs="+", action="extend", metavar="WxH",
                   help="image size(s) in pixels, width x height (default 1024x1024); several -> dynamic range")
    p.add_argument("--batch", default="1", metavar="N|MIN-MAX", help="images per call (default 1)")
    p.add_argument("--static", action="store_true", help="require one shape (refuse ranges)")
    p.add_argument("--no-guidance", action="store_true",
                   help="pipelines without classifier-free guidance (e.g. Kandinsky 3.1 Flash): U-Net batch x1")
    p.add_argument("--timing-cache", metavar="FILE.cache", help="load and update this timing cache "
                   "(default ART/engines/timing-trt<VERSION>-sm<CC>.cache: one per TensorRT version and GPU)")
    p.add_argument("--refittable", action="store_true", help="build engines `k3trt refit` can update")
    p.add_argument("--builder-optimization-level", type=int, default=None, metavar="N",
                   help="0-5 (default 3, 4 for int8/fp8)")
    p.add_argument("--workspace", type=float, default=None, metavar="GB", help="builder workspace limit, 1/1024..4096 (default: TensorRT's, "
                   "the GPU's memory)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.add_argument("--dry-run", action="store_true", help="compute and print the plan; build nothing")
    p.add_argument("--json", metavar="FILE", help="write the plan as JSON")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("check", help="lint ONNX for what TensorRT's parser rejects")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--artifacts", metavar="ART", help="check every ONNX in the directory (and its hashes)")
    group.add_argument("--onnx", metavar="FILE", help="check one ONNX file")
    p.add_argument("--trt-version", default=None, metavar="X.Y", help="TensorRT version to check for (default 10.0)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("refit", help="load new weights into refittable engines without rebuilding")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--model", required=True, metavar="DIR", help="diffusers-layout folder with the new weights")
    p.add_argument("--components", default=None, help="comma list (default: every refittable engine)")
    p.add_argument("--variant", choices=["fp16"], default=None, help="load *.fp16.safetensors weights")
    p.set_defaults(func=cmd_refit)

    p = sub.add_parser("selftest", help="engine stage self-test (--gpu: build tiny engines and check parity)")
    p.add_argument("--gpu", action="store_true", help="the GPU checks: torch on CUDA, a CUDA-graph replay, "
                   "calibration at 1024x1024 on CUDA, and with TensorRT the tiny engines' parity (each part "
                   "passes, fails or is skipped with the reason; exit 0 passed, 1 failed, 3 skipped parts)")
    p.add_argument("--precisions", default=None, help="TensorRT precisions to build and compare, comma list "
                   "(default fp16: 3 builds)")
    p.add_argument("--keep", metavar="DIR", default=None, help="work in DIR and keep it (default: a temp dir)")
    p.set_defaults(func=cmd_selftest)
