"""The calibration report: quality.json (structured, for tools and tests) and report.md with images."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from k3trt.writing.atomic import atomic_write_bytes, atomic_write_json
from k3trt.writing.ownership import claim_output_dir

NOT_QUANTIZED = {
    "text_encoder": "fp32: T5 overflows in reduced precision and runs once per prompt (no int8 variant)",
    "movq_decoder": "fp32: runs once per image; not quantized by this stage (no int8 variant)",
    "movq_encoder": "fp32: runs once per image; not quantized by this stage (no int8 variant)",
}


def unet_label(component: str) -> str:
    return "U-Net" if component == "unet" else f"U-Net [{component}]"


def _mean_psnr(rows: list[dict]) -> float:
    values = [r["psnr_db"] for r in rows]
    return float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else float("nan")


def build_payload(*, record_path: str, settings: dict, exclusions: dict, qdq: dict, measured: dict,
                  component: str = "unet", others: tuple[str, ...] = ("text_encoder", "movq_decoder"),
                  guided: bool = True) -> dict:
    """`others`: the components the trajectories also ran (reported as fp32)."""
    unet = {"variant": "int8", "summary": measured["unet"], "per_timestep": measured["per_timestep"],
            "guided": guided}
    components = {component: unet, **{c: {"variant": "fp32", "note": NOT_QUANTIZED[c]} for c in others}}
    return {
        "component": component, "graph": record_path, "settings": settings, "exclusions": exclusions,
        "qdq": {k: (len(v) if isinstance(v, list) else v) for k, v in qdq.items()},
        "components": components,
        "end_to_end": {"fake_quant": measured["end_to_end"], "mean_psnr_db": _mean_psnr(measured["end_to_end"]),
                       "int8_kernels_cpu": measured["end_to_end_int8_kernels"],
                       "int8_kernels_cpu_mean_psnr_db": _mean_psnr(measured["end_to_end_int8_kernels"])},
        "sensitivity": measured.get("sensitivity"),
    }


def calibrated(payload: dict) -> dict:
    """The calibrated component's section of the payload (reports written before it was named: the U-Net)."""
    return payload["components"][payload.get("component", "unet")]


def quality_summary(payload: dict) -> dict:
    """The short form stored in the manifest record."""
    unet = calibrated(payload)["summary"]
    return {**{k: unet[k] for k in ("mean_cosine", "worst_cosine", "worst_timestep", "mean_rel_l2",
                                    "worst_rel_l2", "mean_guided_cosine", "finite")},
            "end_to_end_psnr_db": [r["psnr_db"] for r in payload["end_to_end"]["fake_quant"]],
            "heldout_prompts": len(payload["end_to_end"]["fake_quant"])}


def format_summary(payload: dict) -> str:
    section = calibrated(payload)
    unet = section["summary"]
    e2e = payload["end_to_end"]
    guided = (f"guided noise (g+1)*cond - g*uncond: cosine mean {unet['mean_guided_cosine']:.5f}, worst "
              f"{unet['worst_guided_cosine']:.5f}") if section.get("guided", True) else \
        "unguided U-Net: its output is the noise the sampler uses"
    lines = [
        f"{unet_label(payload.get('component', 'unet'))} int8 vs fp32 on held-out trajectories "
        f"({len(section['per_timestep'])} timesteps): cosine mean {unet['mean_cosine']:.5f}, worst "
        f"{unet['worst_cosine']:.5f} at t={unet['worst_timestep']}; rel L2 mean {unet['mean_rel_l2']:.4f}, worst "
        f"{unet['worst_rel_l2']:.4f}",
        guided,
        "end-to-end PSNR vs fp32, same seed (fake-quant): " + ", ".join(f"{r['psnr_db']:.2f}" for r in
                                                                     e2e["fake_quant"])
        + f" dB (mean {e2e['mean_psnr_db']:.2f})",
        "end-to-end PSNR with ONNX Runtime's CPU int8 kernels: " + ", ".join(
            f"{r['psnr_db']:.2f}" for r in e2e["int8_kernels_cpu"]) + " dB",
    ]
    if payload.get("timings"):
        lines.append("time: " + ", ".join(f"{name.replace('_', ' ')} {t['wall_s']:.0f} s (CPU {t['cpu_s']:.0f} s)"
                                          for name, t in payload["timings"].items()))
    sens = payload.get("sensitivity")
    if sens:
        top = ", ".join(f"{r['name']} ({r['cost']:.5f})" for r in sens["layers"][:sens["config"]["suggest"]])
        lines.append(f"most sensitive layers (1 - worst-timestep cosine with only that layer int8): {top}")
    return "\n".join(lines)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def write_report(folder: Path, payload: dict, fp32_images: np.ndarray, int8_images: np.ndarray,
                 inputs: list[dict] | None = None) -> Path:
    """`inputs`: per held-out prompt, what the task started from (inpainting: input_image, user_mask), shown
    beside the outputs."""

    folder = claim_output_dir(folder, "report", name="--report")  # new, empty, or an earlier report
    for i, (ref, ours) in enumerate(zip(fp32_images, int8_images)):
        atomic_write_bytes(folder / f"fp32-{i}.png", _png(ref))
        atomic_write_bytes(folder / f"int8-{i}.png", _png(ours))
        for name, array in (inputs[i] if inputs else {}).items():
            tile = array if array.ndim == 3 else np.repeat(array[..., None].astype(np.float32), 3, -1)
            atomic_write_bytes(folder / f"{name}-{i}.png", _png(tile))
    atomic_write_json(folder / "quality.json", json.loads(json.dumps(payload, default=float)))
    atomic_write_bytes(folder / "report.md", markdown(payload).encode())
    return folder / "report.md"


def markdown(payload: dict) -> str:
    s = payload["settings"]
    component = payload.get("component", "unet")
    lines = [f"# INT8 calibration report ({unet_label(component)})", "", f"Model: `{payload['graph']}`", "",
             f"Calibration: {s['calibration_prompts']['count']} prompts from `{s['calibration_prompts']['source']}`"
             f", {s['trajectory']['steps']} steps, {s['trajectory']['width']}x{s['trajectory']['height']}, "
             f"guidance {s['trajectory']['guidance']}; calibrator `{s['quant']['calibrator']}`"
             + (f" ({s['quant']['percentile']})" if "percentile" in s["quant"] else "")
             + f". Q/DQ: {payload['qdq']['quantized_nodes']} layers quantized, "
             f"{payload['qdq']['float_nodes']} Conv/MatMul/Gemm kept float.", "", "```", format_summary(payload),
             "```", "", "## Per timestep (held-out prompts, teacher-forced)", "",
             "| t | cosine | rel L2 | worst prompt cosine | guided cosine |", "|---|---|---|---|---|"]
    for r in calibrated(payload)["per_timestep"]:
        lines.append(f"| {r['timestep']} | {r['cosine']:.5f} | {r['rel_l2']:.4f} | {r['min_prompt_cosine']:.5f} | "
                     f"{r['guided_cosine']:.5f} |")
    shown = payload.get("task_inputs", [])  # e.g. input_image, user_mask (inpainting)
    lines += ["", "## End to end (same seed, fake-quant)", "",
              "| prompt | PSNR dB | " + " | ".join(shown + ["fp32", "int8"]) + " |",
              "|---|---|" + "---|" * (len(shown) + 2)]
    for i, r in enumerate(payload["end_to_end"]["fake_quant"]):
        tiles = " | ".join(f"![]({name}-{i}.png)" for name in shown + ["fp32", "int8"])
        lines.append(f"| {r['prompt']} | {r['psnr_db']:.2f} | {tiles} |")
    lines += _exclusion_lines(payload) + _sensitivity_lines(payload.get("sensitivity"))
    return "\n".join(lines) + "\n"


def _exclusion_lines(payload: dict) -> list[str]:
    ex = payload["exclusions"]
    lines = ["", "## Kept float", "", "| pattern | nodes | why |", "|---|---|---|"]
    for row in ex["patterns"]:
        lines.append(f"| `{row['pattern']}` | {row['nodes']} | {row['why']} |")
    lines.append(f"| attention Q·K and P·V MatMuls | {ex['attention_matmuls']} | activation x activation |")
    return lines


def _cost_row(row: dict) -> str:
    return f"| `{row['name']}` | {row['nodes']} | {row['worst_cosine']:.5f} | {row['cost']:.5f} |"


def _sensitivity_lines(sens: dict | None) -> list[str]:
    if not sens:
        return ["", "Sensitivity: not run (add `--sensitivity`)."]
    lines = ["", "## Sensitivity", "", f"{sens['method']}. Probe: timesteps {sens['probe_timesteps']}, "
             f"{sens['probe_calls']} calls; the full int8 model's worst-timestep cosine there is "
             f"{sens['base_worst_cosine']:.5f}; block costs sum to {sens['total_block_cost']:.5f}.", "",
             "| block (only it int8) | layers | worst cosine | cost |", "|---|---|---|---|"]
    lines += [_cost_row(row) for row in sens["blocks"][:10]]
    lines += ["", "| layer (only it int8) | | worst cosine | cost |", "|---|---|---|---|"]
    lines += [_cost_row(row) for row in sens["layers"]]
    if sens["suggested_exclusions"]:
        lines += ["", "Keep them float: `" + " ".join(f"--exclude {n}" for n in sens["suggested_exclusions"]) + "`"]
    return lines
