"""`k3trt demo --task img2img|inpaint|outpaint|flash`: the tiny preset -> export -> the task on the lean runtime
-> its torch reference -> a report with the input, the mask, the output, the reference and their difference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from k3trt.contract.cards import IMAGE_PSNR_DB
from k3trt.contract.tensor_metrics import psnr

DEMO = dict(steps=12, seed=0, strength=0.6, inpaint_steps=10, outpaint="left=64,bottom=64")
BOUND_DB = IMAGE_PSNR_DB["fp32"]  # the fp32 end-to-end bound, on the cards
COMPARE_HEIGHT = 256  # px: compare.png is enlarged (nearest) to at least this height


def demo_image(height: int = 64, width: int = 128) -> np.ndarray:
    """A deterministic colourful test picture (H, W, 3) uint8: gradients and a disc."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width * 0.3) ** 2 + (y - height * 0.5) ** 2 < (height * 0.3) ** 2).astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 7.0)], -1) * (1 - disc[..., None])
    rgb += disc[..., None] * np.array([0.9, 0.2, 0.1], np.float32)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def demo_mask(height: int = 64, width: int = 128) -> np.ndarray:
    """A user mask (uint8, 255 = repaint): a rectangle over the right half's middle."""
    mask = np.zeros((height, width), np.uint8)
    mask[16:48, 72:120] = 255
    return mask


def _tile(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, -1)
    return array if array.dtype == np.uint8 else (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def write_task_report(folder: Path, task: str, tiles: dict[str, np.ndarray], metrics: dict) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = list(tiles)
    strip = Image.fromarray(np.concatenate([_tile(tiles[n]) for n in names], axis=1))
    zoom = max(1, COMPARE_HEIGHT // strip.height)  # tiny-model images are 64 px: enlarge, pixel for pixel
    strip.resize((strip.width * zoom, strip.height * zoom), Image.NEAREST).save(folder / "compare.png")
    for name, tile in tiles.items():
        Image.fromarray(_tile(tile)).save(folder / f"{name}.png")
    (folder / "report.json").write_text(json.dumps(metrics, indent=2, default=float))
    lines = [f"# k3trt demo: {task}", "", f"Verdict: **{'PASS' if metrics['ok'] else 'FAIL'}**", "",
             " | ".join(names), "", "![compare](compare.png)", "",
             "`difference`: |reference - runtime| averaged over channels and scaled to its own maximum "
             "(`max_abs_vs_reference` below), black -> red -> yellow -> white.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return folder / "report.md"


def run_img2img_demo(model: Path, artifacts: Path, prompt: str, folder: Path, log) -> dict:
    from k3trt.runtime.pipeline import Pipeline
    from k3trt.verify.parity import heat_map
    from k3trt.verify.task_reference import load_img2img_reference, run_img2img_reference
    from PIL import Image

    picture = demo_image()
    kwargs = dict(strength=DEMO["strength"], steps=DEMO["steps"], guidance=3.0, seed=DEMO["seed"])
    log(f"  img2img on the lean runtime (strength {kwargs['strength']}, {kwargs['steps']} steps) ...")
    runtime = Pipeline.from_artifacts(artifacts).img2img(prompt, Image.fromarray(picture), output_type="np",
                                                         **kwargs)
    log("  reference: diffusers.Kandinsky3Img2ImgPipeline ...")
    reference = run_img2img_reference(load_img2img_reference(model), prompt, Image.fromarray(picture), **kwargs)
    db = psnr(reference, runtime)
    metrics = {"task": "img2img", "psnr_db_vs_diffusers": db, "bound_db": BOUND_DB, "ok": db >= BOUND_DB,
               "max_abs_vs_reference": float(np.abs(reference - runtime).max()), **kwargs}
    tiles = {"input": picture, "runtime": runtime[0], "diffusers": reference[0],
             "difference": heat_map(reference[0], runtime[0])}
    metrics["report"] = str(write_task_report(folder, "img2img", tiles, metrics))
    return metrics


def run_inpaint_demo(model: Path, artifacts: Path, prompt: str, folder: Path, log) -> dict:
    from k3trt.export.sources import open_model_dir
    from k3trt.runtime.images import load_image, load_mask
    from k3trt.runtime.pipeline import Pipeline
    from k3trt.verify.parity import heat_map
    from k3trt.verify.task_reference import OfficialModules, inpaint_reference

    picture, user = demo_image(), demo_mask()
    pixels, mask = load_image(picture), load_mask(user, picture.shape[:2])
    kwargs = dict(steps=DEMO["inpaint_steps"], guidance=4.0, seed=DEMO["seed"])
    pipe = Pipeline.from_artifacts(artifacts)
    log(f"  inpainting on the lean runtime ({kwargs['steps']} official sampler steps) ...")
    runtime = pipe.inpaint(prompt, picture, user, output_type="np", preserve_unmasked=False, **kwargs)
    log("  reference: the official inpainting semantics in torch (export/task_reference.py) ...")
    modules = OfficialModules(open_model_dir(model), "unet_inpainting")
    reference = inpaint_reference(modules, prompt, pixels, mask, preserve_unmasked=False, **kwargs)
    keep = (mask[0, 0] == 0).numpy()
    original = picture.astype(np.float32) / 255.0
    pasted = np.where(keep[..., None], original, runtime[0])
    with torch.no_grad():  # MoVQ round trip of the input on the runtime's own components
        trip = pipe.decode(pipe.backend.run("movq_encoder", {"image": pixels})["latents"])[0]
    db = psnr(reference, runtime)
    metrics = {"task": "inpaint", "psnr_db_vs_reference": db, "bound_db": BOUND_DB,
               "max_abs_vs_reference": float(np.abs(reference - runtime).max()),
               "unmasked_max_abs_raw_output": float(np.abs(runtime[0] - original)[keep].max()),
               "unmasked_max_abs_movq_round_trip": float(np.abs(trip - original)[keep].max()),
               "unmasked_max_abs_preserved_output": float(np.abs(pasted - original)[keep].max()), **kwargs}
    metrics["ok"] = bool(db >= BOUND_DB and metrics["unmasked_max_abs_preserved_output"] <=
                         metrics["unmasked_max_abs_movq_round_trip"])
    tiles = {"input": picture, "mask": user, "runtime": runtime[0], "reference": reference[0],
             "difference": heat_map(reference[0], runtime[0]), "preserved": pasted}
    metrics["report"] = str(write_task_report(folder, "inpaint", tiles, metrics))
    return metrics


def run_outpaint_demo(model: Path, artifacts: Path, prompt: str, folder: Path, log) -> dict:
    """Outpainting = inpainting on a grown canvas: the runtime (`outpaint=`) against the reference fed the same
    canvas and mask; the original picture must come back untouched where it sits on the canvas."""
    from k3trt.export.sources import open_model_dir
    from k3trt.runtime.images import load_image, outpaint_canvas, parse_margins
    from k3trt.runtime.pipeline import Pipeline
    from k3trt.verify.parity import heat_map
    from k3trt.verify.task_reference import OfficialModules, inpaint_reference

    picture, margins = demo_image(), parse_margins(DEMO["outpaint"])
    canvas, user = outpaint_canvas(load_image(picture), margins)
    kwargs = dict(steps=DEMO["inpaint_steps"], guidance=4.0, seed=DEMO["seed"])
    log(f"  outpainting on the lean runtime ({DEMO['outpaint']}, {kwargs['steps']} official sampler steps) ...")
    pipe = Pipeline.from_artifacts(artifacts)
    raw = pipe.inpaint(prompt, picture, outpaint=DEMO["outpaint"], output_type="np", preserve_unmasked=False,
                       **kwargs)
    kept = pipe.inpaint(prompt, picture, outpaint=DEMO["outpaint"], output_type="np", **kwargs)[0]
    log("  reference: the official inpainting semantics in torch on the same canvas ...")
    modules = OfficialModules(open_model_dir(model), "unet_inpainting")
    reference = inpaint_reference(modules, prompt, canvas, user, preserve_unmasked=False, **kwargs)
    top, left = margins["top"], margins["left"]
    inside = kept[top:top + picture.shape[0], left:left + picture.shape[1]]
    db = psnr(reference, raw)
    metrics = {"task": "outpaint", "margins": DEMO["outpaint"], "psnr_db_vs_reference": db, "bound_db": BOUND_DB,
               "max_abs_vs_reference": float(np.abs(reference - raw).max()),
               "original_max_abs_preserved_output": float(np.abs(inside - picture / 255.0).max()), **kwargs}
    metrics["ok"] = bool(db >= BOUND_DB and metrics["original_max_abs_preserved_output"] < 1e-6)
    tiles = {"input": ((canvas[0].permute(1, 2, 0).numpy() + 1) / 2), "mask": user[0, 0].numpy(), "runtime": raw[0],
             "reference": reference[0], "difference": heat_map(reference[0], raw[0]), "preserved": kept}
    metrics["report"] = str(write_task_report(folder, "outpaint", tiles, metrics))
    return metrics


def run_flash_demo(model: Path, artifacts: Path, prompt: str, folder: Path, log) -> dict:
    from k3trt.export.sources import open_model_dir
    from k3trt.runtime.pipeline import Pipeline
    from k3trt.verify.parity import heat_map
    from k3trt.verify.task_reference import OfficialModules, flash_reference

    size = dict(height=64, width=128, seed=DEMO["seed"])
    log("  Kandinsky 3.1 Flash on the lean runtime (4 steps, no guidance) ...")
    runtime = Pipeline.from_artifacts(artifacts).flash(prompt, output_type="np", **size)
    log("  reference: the official Flash sampler in torch (export/task_reference.py) ...")
    reference = flash_reference(OfficialModules(open_model_dir(model), "unet_flash"), prompt, **size)
    db = psnr(reference, runtime)
    metrics = {"task": "flash", "psnr_db_vs_reference": db, "bound_db": BOUND_DB, "ok": db >= BOUND_DB,
               "max_abs_vs_reference": float(np.abs(reference - runtime).max()), **size}
    tiles = {"runtime": runtime[0], "reference": reference[0], "difference": heat_map(reference[0], runtime[0])}
    metrics["report"] = str(write_task_report(folder, "flash", tiles, metrics))
    return metrics


DEMOS = {"img2img": run_img2img_demo, "inpaint": run_inpaint_demo, "outpaint": run_outpaint_demo,
         "flash": run_flash_demo}


def run_task_demo(task: str, model: Path, out: Path, prompt: str, log) -> int:
    """`k3trt demo --task img2img|inpaint|outpaint|flash` after the preset is written: export, run, compare,
    report."""
    from k3trt.export.sources import open_model_dir
    from k3trt.export.writer import export_artifacts

    artifacts = out / "artifacts"
    log(f"[2/3] exporting to ONNX (the task components included) -> {artifacts}")
    export_artifacts(open_model_dir(model), artifacts, log=log)
    log(f"[3/3] {task} on the lean runtime and its torch reference")
    metrics = DEMOS[task](model, artifacts, prompt, out / f"report-{task}", log)
    for key, value in metrics.items():
        if key not in ("report", "task"):
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"report: {metrics['report']}")
    return 0 if metrics["ok"] else 1
