"""What makes a `k3trt bench` figure trustworthy or not: per-stage dispersion over the repeats, the machine's load
before and after the run, the library versions, and the warnings that follow from them (issue 19 item 8: a 62.85x
speed-up was once printed from 2 repeats on a loaded machine, with no spread shown).

The rules, written next to the code that applies them:
- fewer than MIN_REPEATS timed repeats: no spread can be judged, so every ratio is flagged;
- a side whose total time spreads by more than MAX_SPREAD of its median ((max - min) / median): the ratio of
  medians is flagged (the machine's speed changed during the run);
- the 1-minute load average above LOAD_SHARE of the cores before the run starts (other processes), or above the
  run's own threads plus that share at the end: flagged, since other work took cores from the timed code.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
from importlib import metadata

MIN_REPEATS = 3
MAX_SPREAD = 0.10  # (max - min) / median of a side's total: above it the median ratio is not reliable
LOAD_SHARE = 0.25  # load average above a quarter of the cores (beyond the run's own threads) means contention
VERSIONED = ("kandinsky3-trt", "onnxruntime", "openvino", "torch", "diffusers", "numpy")


def dispersion(values: list[float]) -> dict:
    """min / quartiles / median / max of seconds, in ms, with the relative spread (max - min) / median."""
    ms = sorted(v * 1e3 for v in values)
    q1, median, q3 = (statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3)
    return {"n": len(ms), "min_ms": ms[0], "q1_ms": q1, "median_ms": median, "q3_ms": q3, "max_ms": ms[-1],
            "iqr_ms": q3 - q1, "spread": (ms[-1] - ms[0]) / median if median > 0 else 0.0}


def side_dispersion(stages: dict) -> dict:
    """stage -> dispersion, the U-Net's per call (named unet_step, as the medians)."""
    return {("unet_step" if stage == "unet" else stage): dispersion(values) for stage, values in stages.items()}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def machine_info(threads: int, load_before: float | None, load_after: float | None) -> dict:
    from k3trt.contract.arguments import available_cores
    from k3trt.runtime.cpuinfo import cpu_info

    return {"cpu": cpu_info().describe(), "cores": available_cores(), "threads": threads,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_before": load_before, "load_after": load_after}


def versions() -> dict:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def reliability_warnings(spread: dict[str, dict], repeats: int, machine: dict) -> list[str]:
    """Why a ratio in this result may not hold (empty: none of the rules above fired)."""
    warnings = []
    if repeats < MIN_REPEATS:
        warnings.append(f"only {repeats} timed repeat(s): no spread can be judged; use --repeats {MIN_REPEATS} or "
                        "more before quoting a ratio")
    for side, stages in spread.items():
        total = stages.get("total")
        if total and total["n"] > 1 and total["spread"] > MAX_SPREAD:
            warnings.append(f"{side}: total time spread {100 * total['spread']:.0f}% ({total['min_ms']:.0f} to "
                            f"{total['max_ms']:.0f} ms) > {100 * MAX_SPREAD:.0f}%: the machine's speed changed "
                            "during the run, ratios are unreliable")
    cores, threads = machine["cores"], machine["threads"]
    before, after = machine.get("load_before"), machine.get("load_after")
    if before is not None and before > LOAD_SHARE * cores:
        warnings.append(f"load average {before:.2f} on {cores} cores before the run: other processes compete for "
                        "the CPU, timings are unreliable (run on an idle machine)")
    if after is not None and after > threads + LOAD_SHARE * cores:
        warnings.append(f"load average {after:.2f} after the run, above its {threads} thread(s) + "
                        f"{LOAD_SHARE * cores:.1f}: other processes competed for the CPU")
    return warnings
