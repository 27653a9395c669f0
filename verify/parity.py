"""Parity between the runtime and the PyTorch reference, as structured results the CLI and tests share.

Two views, because a random diffusion U-Net can be chaotic: free-running (each side runs its own loop; small
per-call differences may grow over the steps) and teacher-forced (every U-Net call of the runtime is fed the
reference's own inputs, so per-step errors are measured without accumulation). A bug shows in the
teacher-forced errors; chaos shows only in the free-running ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from k3trt.contract.cards import IMAGE_PSNR_DB, card
from k3trt.contract.tensor_metrics import compare, psnr
from k3trt.writing.ownership import claim_output_dir

# Bounds per component and precision are on the cards (`ComponentCard.parity`); end-to-end image PSNR by the
# lowest precision any component runs in is `cards.IMAGE_PSNR_DB`.


@dataclasses.dataclass
class Check:
    name: str
    metrics: dict
    bound: str
    ok: bool | None  # None: reported, not judged (free-running U-Net steps)


@dataclasses.dataclass
class ParityReport:
    request: dict
    precision: dict
    checks: list[Check]
    teacher_forced: list[dict]  # per step: timestep, rel_l2, cosine, max_abs
    images: tuple[np.ndarray, np.ndarray] | None = None  # (reference, runtime), not serialized

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "request": self.request, "precision": self.precision,
                "checks": [dataclasses.asdict(c) for c in self.checks], "teacher_forced": self.teacher_forced}


def _bound_text(tolerance) -> str:
    return f"rel_l2 <= {tolerance.rel_l2:g}, cosine >= {tolerance.cosine:g}"


def _judged(name: str, ref, got, precision: str) -> Check:
    metrics = compare(ref, got)
    tolerance = card(name).parity_tolerance(precision)
    return Check(name, metrics.as_dict(), _bound_text(tolerance), metrics.within(**tolerance.bounds()))


def _text_check(backend, reference, precision: str) -> Check:
    call = reference.text_calls[0]
    feeds = {"input_ids": call["input_ids"].to(torch.int32), "attention_mask": call["attention_mask"].to(torch.int32)}
    got = backend.run("text_encoder", {k: v.to(backend.device) for k, v in feeds.items()})["last_hidden_state"]
    return _judged("text_encoder", call["hidden"], got, precision)


def _teacher_forced(backend, reference, precision: str) -> tuple[list[dict], Check]:
    steps = []
    for i, call in enumerate(reference.unet_calls):
        batch = call["sample"].shape[0]
        feeds = {"sample": call["sample"], "timestep": torch.full((batch,), float(call["timestep"])),
                 "encoder_hidden_states": call["context"], "encoder_attention_mask": call["mask"].float()}
        got = backend.run("unet", {k: v.to(backend.device) for k, v in feeds.items()})["noise_pred"]
        steps.append({"step": i, "timestep": call["timestep"], **compare(call["out"], got).as_dict()})
    tolerance = card("unet").parity_tolerance(precision)
    worst = max(steps, key=lambda s: s["rel_l2"] if s["finite"] else math.inf)
    ok = all(s["finite"] and s["rel_l2"] <= tolerance.rel_l2 and s["cosine"] >= tolerance.cosine for s in steps)
    return steps, Check("unet teacher-forced (worst step)", worst, "every step " + _bound_text(tolerance), ok)


def _free_running(reference, recorded: list) -> list[Check]:
    n = min(len(reference.unet_calls), len(recorded))
    picks = {"first": 0, "middle": n // 2, "last": n - 1}
    return [Check(f"unet free-running {label} step (t={recorded[i]['timestep']})",
                  compare(reference.unet_calls[i]["out"], recorded[i]["noise_pred"]).as_dict(),
                  "reported, not judged (inputs differ once the loops diverge)", None)
            for label, i in picks.items()]


def _movq_check(backend, reference, precision: str) -> Check:
    call = reference.movq_calls[-1]
    got = backend.run("movq_decoder", {"latents": call["latents"].to(backend.device)})["image"]
    return _judged("movq_decoder", call["image"], got, precision)


def compare_runs(pipeline, reference, request, runtime_images: np.ndarray, recorded: list) -> ParityReport:
    """Judge a runtime generation (`runtime_images`, its U-Net `recorded` calls) against a reference run."""
    precision = {c: pipeline.backend.effective_precision(c) for c in ("text_encoder", "unet", "movq_decoder")}
    checks = [_text_check(pipeline.backend, reference, precision["text_encoder"])]
    steps, forced = _teacher_forced(pipeline.backend, reference, precision["unet"])
    checks += [forced, *_free_running(reference, recorded), _movq_check(pipeline.backend, reference,
                                                                        precision["movq_decoder"])]
    e2e_bound = min(IMAGE_PSNR_DB[p] for p in precision.values())
    image_db = psnr(reference.images, runtime_images)
    checks.append(Check("end-to-end image", {"psnr_db": image_db, **compare(reference.images, runtime_images)
                                             .as_dict()}, f"psnr_db >= {e2e_bound:g}", image_db >= e2e_bound))
    return ParityReport(dataclasses.asdict(request), precision, checks, steps, (reference.images, runtime_images))


# ----------------------------------------------------------------------------------------- rendering
def format_table(report: ParityReport) -> str:
    rows = [f"{'check':<44} {'max_abs':>10} {'rel_l2':>10} {'cosine':>10} {'psnr_db':>8}  verdict"]
    for c in report.checks:
        m = c.metrics
        verdict = {True: "ok", False: f"FAIL ({c.bound})", None: "info"}[c.ok]
        db = f"{m['psnr_db']:8.2f}" if "psnr_db" in m else " " * 8
        rows.append(f"{c.name:<44} {m['max_abs']:10.3g} {m['rel_l2']:10.3g} {m['cosine']:10.6f} {db}  {verdict}")
    rows.append(f"parity: {'PASS' if report.ok else 'FAIL'}")
    return "\n".join(rows)


def heat_map(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """|difference| averaged over channels, scaled to its max, black -> red -> yellow -> white (uint8 RGB)."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).mean(-1)
    peak = diff.max()
    x = diff / peak if peak > 0 else diff
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
    return (rgb * 255).round().astype(np.uint8)


def write_report(report: ParityReport, folder: str | Path) -> Path:
    """report.json, report.md, and per image a side-by-side PNG (reference | runtime | difference heat map)."""
    from PIL import Image


    folder = claim_output_dir(folder, "report", name="--report")  # new, empty, or an earlier report
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=float))
    lines = ["# k3trt parity report", "", f"Verdict: **{'PASS' if report.ok else 'FAIL'}**", "",
             f"Request: `{json.dumps(report.request, ensure_ascii=False)}`", "",
             f"Precision: `{report.precision}`", "", "```", format_table(report), "```", ""]
    ref_images, run_images = report.images
    for i, (a, b) in enumerate(zip(ref_images, run_images)):
        tiles = [(a * 255).round().astype(np.uint8), (b * 255).round().astype(np.uint8), heat_map(a, b)]
        name = f"compare-{i}.png"
        Image.fromarray(np.concatenate(tiles, axis=1)).save(folder / name)
        lines += [f"Image {i}: reference | runtime | |difference| (scaled to its max, "
                  f"max abs {np.abs(a - b).max():.3g}, PSNR {psnr(a, b):.1f} dB)", "", f"![image {i}]({name})", ""]
    lines += ["## Teacher-forced U-Net, per step", "", "| step | t | rel_l2 | cosine | max_abs |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['timestep']} | {s['rel_l2']:.3g} | {s['cosine']:.6f} | {s['max_abs']:.3g} |"
              for s in report.teacher_forced]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return folder / "report.md"
