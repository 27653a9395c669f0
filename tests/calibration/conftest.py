"""Calibration-stage fixtures: one calibrated copy of the tiny artifacts per session (tiny preset, 2 + 2
prompts, 3 steps, 64 x 64), read-only for tests; `calibrated_copy` for tests that change it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cal_helpers import tiny_request

@pytest.fixture(scope="session")
def calibrated(tiny_artifacts, tmp_path_factory) -> tuple[Path, dict]:
    """(artifact dir with an int8 U-Net, the report payload calibrate returned)."""
    from k3trt.calibration.stage import calibrate

    root = tmp_path_factory.mktemp("calibrated") / "art"
    shutil.copytree(tiny_artifacts, root)
    payload = calibrate(tiny_request(root, float_parts="fp16"), log=lambda *_: None)  # what TensorRT 11 runs
    return root, payload


@pytest.fixture()
def calibrated_copy(calibrated, tmp_path) -> Path:
    dest = tmp_path / "art"
    shutil.copytree(calibrated[0], dest)
    return dest


@pytest.fixture(scope="session")
def calibrated_inpainting(calibrated, tmp_path_factory) -> tuple[Path, dict]:
    """`calibrated` plus an int8 inpainting U-Net, calibrated on inpainting trajectories over the images of the
    cached text-to-image trajectories (reused, not recomputed). Read-only for tests."""
    from k3trt.calibration.stage import calibrate

    root = tmp_path_factory.mktemp("calibrated-inpainting") / "art"
    shutil.copytree(calibrated[0], root)
    payload = calibrate(tiny_request(root, component="unet_inpainting"), log=lambda *_: None)
    return root, payload
