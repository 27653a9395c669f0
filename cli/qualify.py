"""`k3trt qualify`: measure each reduced precision this machine can run against fp32, end to end on held-out
prompts, and record it in the manifest (what `--precision auto` and the precision warnings read). The work is
imported when the command runs (verify/qualify.py)."""
from __future__ import annotations

from k3trt.cli.arguments import add_min_psnr_arg, add_size_args, log, resolve_size
from k3trt.contract.arguments import MAX_STEPS, check_float, check_int, check_threads
from k3trt.contract.limits import check_image_request, default_size
from k3trt.contract.manifest import Manifest

MAX_QUALIFY_PROMPTS = 32  # held-out prompts shipped with k3trt (calibration/prompts/heldout_prompts.txt)


def cmd_qualify(args) -> int:
    from k3trt.calibration.prompts import heldout_prompts
    from k3trt.runtime.backends.auto import check_min_psnr, choose_precision_auto
    from k3trt.runtime.pipeline import Pipeline
    from k3trt.verify.qualify import candidates, measure, records, save_records, sides_for

    from k3trt.verify.bench_stats import LOAD_SHARE, load_average

    load_before = load_average()  # before anything loads: what other processes put on the machine
    manifest = check_qualify_args(args)
    reduced = candidates(manifest, args.precision)
    min_psnr = check_min_psnr(args.min_psnr)
    sides = sides_for(reduced)
    prompts = heldout_prompts(args.prompts).prompts
    request = dict(steps=args.steps, guidance=args.guidance, height=args.height, width=args.width)
    log(f"qualifying {', '.join(s.label for s in reduced)} against {sides[0].label} on {len(prompts)} held-out "
        f"prompt(s), {args.width}x{args.height}, {args.steps} steps, interleaved ...")

    def open_side(side):
        return Pipeline.from_artifacts(manifest, side.backend, side.precision, threads=args.threads)

    runs = measure(open_side, sides, prompts, request, log)
    load = {"before": load_before, "after": load_average()}
    measured = records(manifest, sides, runs, threads=args.threads or _cores(), request=request,
                       prompts=len(prompts), load=load)
    saved = save_records(manifest.root, measured, log)
    print(format_records(measured, min_psnr))
    if load_before is not None and load_before > LOAD_SHARE * _cores():
        print(f"WARNING: load average {load_before:.2f} on {_cores()} cores before the run: the speed-ups above are "
              "unreliable (quality figures are not affected); re-run `k3trt qualify` on an idle machine")
    chosen, _, reason = choose_precision_auto(saved.data, min_psnr=min_psnr)
    print(f"--precision auto now picks {chosen} ({reason})")
    return 0


def _cores() -> int:
    from k3trt.contract.arguments import available_cores

    return available_cores()


def format_records(measured: dict, min_psnr: float) -> str:
    rows = [f"{'precision':<10} {'backend':<9} {'PSNR worst':>10} {'mean':>7} {'cosine':>9} {'ms/image':>9} "
            f"{'fp32 ms':>8} {'speed-up':>8} {'U-Net step vs fp32, same backend':>33}  verdict"]
    for precision, r in measured.items():
        if r.get("non_finite"):
            rows.append(f"{precision:<10} {r['backend']:<9} NaN/Inf end to end: {r['non_finite']}  FAILS")
            continue
        ok = r["psnr_db"] >= min_psnr
        verdict = f"{'meets' if ok else 'BELOW'} {min_psnr:g} dB" + ("" if r["speedup"] > 1 else ", SLOWER than fp32")
        rows.append(f"{precision:<10} {r['backend']:<9} {r['psnr_db']:9.1f}  {r['psnr_db_mean']:6.1f} "
                    f"{r['cosine']:9.6f} {r['total_ms']:9.1f} {r['fp32_total_ms']:8.1f} {r['speedup']:7.2f}x "
                    f"{r['unet_step_ms']:12.1f} vs {r['fp32_unet_step_ms_same_backend']:.1f} ms "
                    f"({r['unet_speedup_same_backend']:.2f}x)  {verdict}")
    return "\n".join(rows)


def check_qualify_args(args) -> Manifest:
    """Every argument before anything loads; returns the manifest."""
    manifest = Manifest.load(args.artifacts)
    check_int("--prompts", args.prompts, 1, MAX_QUALIFY_PROMPTS, "e.g. --prompts 4")
    check_int("--steps", args.steps, 1, MAX_STEPS, "e.g. --steps 25")
    check_float("--guidance", args.guidance, 0, 1e4)
    check_float("--min-psnr", args.min_psnr, 1e-6, 199.0, "e.g. --min-psnr 30")
    check_threads(args.threads, "--threads")
    resolve_size(args, default_size(manifest))
    check_image_request(manifest, height=args.height, width=args.width, images=1, guided=args.guidance > 1)
    return manifest


def register(sub) -> None:
    p = sub.add_parser("qualify", help="measure bf16/int8 end to end against fp32 on held-out prompts and record "
                                       "it in the manifest (for --precision auto)")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--precision", action="append", choices=["bf16", "int8"],
                   help="measure only this precision (repeatable; default: every one this machine can run: bf16 "
                        "on OpenVINO with native bf16, int8 on ONNX Runtime once `k3trt calibrate` ran)")
    p.add_argument("--prompts", type=int, default=4, help=f"held-out prompts, 1..{MAX_QUALIFY_PROMPTS} (default 4)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image (default 25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    add_size_args(p, "default: the size the artifacts were made for")
    p.add_argument("--threads", type=int, default=None, help="threads for every side (default: all cores)")
    add_min_psnr_arg(p)
    p.set_defaults(func=cmd_qualify)
