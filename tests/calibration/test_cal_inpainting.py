"""INT8 calibration of the inpainting U-Net on masked inpainting trajectories (tiny preset, 2 + 2 prompts, 3
official-sampler steps, 64 x 64): the masks, the trajectories, the manifest record, the quality bounds of the
base U-Net, and `--precision int8` for the inpainting task."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from k3trt.calibration import collect
from k3trt.calibration.masks import LAYOUTS, calibration_mask, layout_of
from k3trt.calibration.targets import quantizable, target_of
from k3trt.contract.manifest import Manifest
from k3trt.contract.errors import ArtifactError, InvalidArgumentError

from cal_helpers import checked_int8_record, tiny_request

# Measured with this fixture's settings: inpainting U-Net cosine vs fp32 0.9945-0.9964 per timestep (3 + 3 prompts,
# by hand); the base U-Net's bound (test_cal_stage.TINY_COSINE) applies unchanged.
TINY_COSINE = 0.99


def test_masks_are_deterministic_binary_and_mix_three_layouts():
    assert [layout_of(s) for s in range(6)] == list(LAYOUTS) * 2
    for seed in range(9):
        mask = calibration_mask(seed, 128, 192)
        assert mask.shape == (128, 192) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert 0.02 < mask.mean() < 0.98  # some to repaint, some to keep
        np.testing.assert_array_equal(mask, calibration_mask(seed, 128, 192))
    outpaint = calibration_mask(2, 256, 256)  # bands along sides, on the 64-px outpaint grid
    rows, cols = outpaint.any(1), outpaint.any(0)
    full_rows, full_cols = outpaint.all(1), outpaint.all(0)
    assert (full_rows | full_cols).sum() > 0 and (rows.sum() % 64 == 0 or cols.sum() % 64 == 0)
    assert not np.array_equal(calibration_mask(0, 64, 64), calibration_mask(3, 64, 64))  # seeds differ


def test_only_cards_with_an_int8_variant_are_targets():
    assert quantizable() == ("unet", "unet_inpainting", "unet_flash")
    assert (target_of("unet").task, target_of("unet_inpainting").task, target_of("unet_flash").task) == \
        ("text2img", "inpaint", "flash")
    with pytest.raises(InvalidArgumentError, match="movq_encoder.*has no int8 variant"):
        target_of("movq_encoder")


def test_trajectories_carry_the_mask_and_the_masked_image(calibrated_inpainting):
    root, _ = calibrated_inpainting
    manifest = Manifest.load(root)
    target = target_of("unet_inpainting")
    from k3trt.calibration.config import TrajectoryConfig
    from k3trt.calibration.prompts import heldout_prompts

    config = TrajectoryConfig(steps=3, height=64, width=64)
    sources = collect.plan(manifest, heldout_prompts(2), config)
    trajectories = collect.plan(manifest, heldout_prompts(2), config, target, sources)
    assert all(f.path.is_file() for f in trajectories.files)  # the fixture's held-out set
    for item, source in zip(trajectories.files, sources.files):
        arrays = item.load()
        sample = arrays["unet_inpainting__sample"]
        assert sample.shape == (3, 2, 9, 8, 8)  # 3 steps of [uncond, cond], 9 channels
        assert arrays["unet_inpainting__timestep"][:, 0].tolist() == [999, 666, 333]  # the official sampler
        keep = 1 - torch.from_numpy(arrays["user_mask"].astype(np.float32))[None, None]
        np.testing.assert_array_equal(sample[:, :, 4], np.broadcast_to(
            F.interpolate(keep, size=(8, 8), mode="nearest")[0, 0].numpy(), sample[:, :, 4].shape))
        assert np.array_equal(sample[0, :, 5:], sample[-1, :, 5:])  # masked-image latents: constant
        np.testing.assert_array_equal(arrays["user_mask"], calibration_mask(item.seed, 64, 64))
        expected = np.round(source.load()["image"][0] * 255) / 255  # the text-to-image picture, at 8 bits
        np.testing.assert_allclose(arrays["input_image"], expected, atol=1e-6)
    from k3trt.calibration.prompts import calibration_prompts

    sources = collect.plan(manifest, calibration_prompts(None, 2), config, decode=False)
    latent_only = collect.plan(manifest, calibration_prompts(None, 2), config, target, sources, decode=False)
    for item in latent_only.files:  # calibration prompts: no decoded output; the source decoded for its picture
        arrays = item.load()
        assert "image" not in arrays and arrays["movq_decoder__latents"].shape == (1, 4, 8, 8)
        assert arrays["input_image"].shape == (64, 64, 3) and arrays["unet_inpainting__sample"].shape[2] == 9


def test_manifest_records_the_int8_inpainting_unet(calibrated_inpainting):
    root, _ = calibrated_inpainting
    manifest = Manifest.load(root)
    _, int8 = checked_int8_record(manifest, "unet_inpainting")
    assert int8.inputs[0].shape[1] == 9
    assert {"/unet/conv_in/Conv", "/encoder_hid_proj/projection_linear/MatMul"} <= set(int8.extra["excluded_nodes"])
    assert int8.extra["calibration"]["task"] == "inpaint" and int8.extra["quality"]["worst_cosine"] >= TINY_COSINE
    assert manifest.has_onnx("unet", "int8")  # the base U-Net's int8 variant is still there


def test_quality_json_structure_and_bounds(calibrated_inpainting):
    root, payload = calibrated_inpainting
    report = root / payload["report"]
    on_disk = json.loads(report.with_name("quality.json").read_text())
    unet = on_disk["components"]["unet_inpainting"]
    assert on_disk["component"] == "unet_inpainting" and unet["guided"]
    assert [r["timestep"] for r in unet["per_timestep"]] == [999, 666, 333]
    assert unet["summary"]["mean_cosine"] >= unet["summary"]["worst_cosine"] >= TINY_COSINE
    assert all(0 < r["rel_l2"] < 0.2 and r["finite"] for r in unet["per_timestep"])
    assert on_disk["components"]["movq_encoder"]["variant"] == "fp32"
    e2e = on_disk["end_to_end"]["fake_quant"]
    assert len(e2e) == 2 and all(15 < r["psnr_db"] < 80 for r in e2e)
    text = report.read_text()
    assert "U-Net [unet_inpainting]" in text and "![](user_mask-1.png)" in text
    assert report.with_name("input_image-0.png").is_file() and report.with_name("user_mask-0.png").is_file()


def test_inpaint_task_runs_the_int8_unet(calibrated_inpainting, tmp_path):
    from PIL import Image

    from k3trt.verify.task_demo import demo_image, demo_mask
    from k3trt.runtime import Pipeline
    from k3trt.cli.main import main

    pipe = Pipeline.from_artifacts(calibrated_inpainting[0], "ort", "int8", disable_quant_qdq=True)
    images = pipe.inpaint("a lighthouse", demo_image(), demo_mask(), steps=2, output_type="np")
    assert pipe.backend.record("unet_inpainting").variant == "int8"
    assert pipe.backend.record("movq_encoder").variant == "fp32" and np.isfinite(images).all()
    Image.fromarray(demo_image()).save(tmp_path / "in.png")
    Image.fromarray(demo_mask()).save(tmp_path / "mask.png")
    assert main(["generate", "--artifacts", str(calibrated_inpainting[0]), "--precision", "int8", "--prompt", "a fox",
                 "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "2",
                 "--out", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (128, 64)


def test_engine_dry_run_plan_accepts_the_int8_inpainting_unet(calibrated_inpainting):
    import k3trt.engines.plan as plan_mod  # TensorRT-free: always importable, so no skip
    manifest = Manifest.load(calibrated_inpainting[0])
    plan = plan_mod.make_plan(manifest, precision="int8", components="unet_inpainting", resolutions=["64x64"])
    (unet,) = plan.components
    assert unet.precision.variant == "int8"
    assert unet.onnx_path == manifest.onnx("unet_inpainting", "int8").graph.path


def test_unknown_or_missing_component_fails_before_any_trajectory(artifacts_copy, capsys, monkeypatch):
    from k3trt.cli.main import main

    def no_pipeline(*_args, **_kwargs):
        raise AssertionError("a trajectory ran")

    monkeypatch.setattr(collect, "fp32_pipeline", no_pipeline)
    with pytest.raises(SystemExit) as exit_:  # argparse: exit status 2 and the choices
        main(["calibrate", "--artifacts", str(artifacts_copy), "--component", "movq_encoder"])
    assert exit_.value.code == 2 and "invalid choice: 'movq_encoder'" in capsys.readouterr().err
    manifest = json.loads((artifacts_copy / "manifest.json").read_text())
    del manifest["onnx"]["unet_inpainting"]
    (artifacts_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unet_inpainting"):
        from k3trt.calibration.stage import calibrate

        calibrate(tiny_request(artifacts_copy, component="unet_inpainting"), log=lambda *_: None)
    assert main(["calibrate", "--artifacts", str(artifacts_copy), "--component", "unet_inpainting"]) != 0
    assert "--components unet_inpainting" in capsys.readouterr().err


@pytest.mark.slow  # another calibration (~35 s on 2 shared cores); the mechanics are the inpainting ones
def test_flash_unet_calibrates_on_unguided_flash_trajectories(calibrated, tmp_path):
    import shutil

    from k3trt.calibration.stage import calibrate

    root = tmp_path / "art"
    shutil.copytree(calibrated[0], root)
    payload = calibrate(tiny_request(root, component="unet_flash"), log=lambda *_: None)
    record = Manifest.load(root).onnx("unet_flash", "int8")
    assert record.extra["calibration"]["task"] == "flash" and record.extra["quality"]["finite"]
    flash = payload["components"]["unet_flash"]
    assert not flash["guided"] and [r["timestep"] for r in flash["per_timestep"]] == [979, 729, 479, 229]
    assert all(r["guided_cosine"] == r["cosine"] for r in flash["per_timestep"])  # no guidance to apply
    # NOT the base U-Net's bound: the random-weight Flash U-Net's trajectory leaves the noise scale (sample std
    # 1.0 at t=979, ~30 at t=229, measured), so per-tensor ranges pooled over its 4 steps are coarse at the first
    # step. Measured worst cosine 0.909 (t=979) with 3 + 3 prompts; a trained Flash U-Net stays near std 1.
    assert flash["summary"]["worst_cosine"] > 0.8
