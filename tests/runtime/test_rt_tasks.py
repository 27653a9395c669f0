"""Image to image, inpainting/outpainting and Flash on ONNX Runtime against their torch references (tiny preset).

References: diffusers.Kandinsky3Img2ImgPipeline (img2img); export/task_reference.py, written from the official
code (inpainting, Flash). Bounds: the fp32 end-to-end bound, PSNR >= 40 dB.
"""
import numpy as np
import pytest
from PIL import Image

from spy_helpers import BackendSpy
from k3trt.runtime import Pipeline
from k3trt.contract.errors import ArtifactError, InvalidArgumentError
from k3trt.contract.tensor_metrics import psnr

E2E_PSNR_DB = 40.0
PROMPT = "a red fox in a snowy forest, watercolor"


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


@pytest.fixture(scope="module")
def picture():
    from k3trt.verify.task_demo import demo_image

    return demo_image()  # 64 x 128


def test_img2img_matches_diffusers(pipe, picture, tiny_model_dir):
    from k3trt.verify.task_reference import load_img2img_reference, run_img2img_reference

    kwargs = dict(strength=0.6, steps=10, guidance=3.0, seed=5, num_images=2)
    ours = pipe.img2img(PROMPT, Image.fromarray(picture), output_type="np", **kwargs)
    ref = run_img2img_reference(load_img2img_reference(tiny_model_dir), PROMPT, Image.fromarray(picture), **kwargs)
    db = psnr(ref, ours)
    print(f"img2img vs Kandinsky3Img2ImgPipeline: {db:.1f} dB")
    assert ours.shape == ref.shape == (2, 64, 128, 3) and db >= E2E_PSNR_DB
    steps = []
    pipe.img2img(PROMPT, picture, strength=0.6, steps=10, callback=lambda info: steps.append(info.timestep))
    assert len(steps) == 6  # int(10 * 0.6) of the schedule's last timesteps


@pytest.fixture(scope="module")
def inpaint_modules(tiny_model_dir):
    from k3trt.export.sources import open_model_dir
    from k3trt.verify.task_reference import OfficialModules

    return OfficialModules(open_model_dir(tiny_model_dir), "unet_inpainting")


def test_inpaint_matches_the_official_semantics(pipe, picture, inpaint_modules):
    from k3trt.verify.task_demo import demo_mask
    from k3trt.verify.task_reference import inpaint_reference
    from k3trt.runtime.images import load_image, load_mask

    user = demo_mask()
    kwargs = dict(steps=8, guidance=4.0, seed=3)
    ours = pipe.inpaint(PROMPT, picture, user, output_type="np", preserve_unmasked=False, **kwargs)
    ref = inpaint_reference(inpaint_modules, PROMPT, load_image(picture), load_mask(user, (64, 128)),
                            preserve_unmasked=False, **kwargs)
    db = psnr(ref, ours)
    print(f"inpainting vs the official-semantics torch reference: {db:.1f} dB")
    assert ours.shape == (1, 64, 128, 3) and db >= E2E_PSNR_DB
    kept = pipe.inpaint(PROMPT, picture, user, output_type="np", **kwargs)[0]
    keep = user == 0
    original = picture / 255.0
    assert np.abs(kept - original)[keep].max() < 1e-6  # unmasked pixels are the input's
    np.testing.assert_allclose(kept[~keep], ours[0][~keep])  # the repainted region is the model's


def test_outpaint_grows_the_canvas_and_keeps_the_image(pipe, picture):
    out = pipe.inpaint(PROMPT, picture, outpaint="left=64,bottom=64", steps=4, output_type="np")
    assert out.shape == (1, 128, 192, 3)
    np.testing.assert_allclose(out[0, :64, 64:], picture / 255.0, atol=1e-6)
    assert out[0, 64:, :].std() > 0.01  # the new margin was painted


def test_flash_matches_the_official_semantics(pipe, tiny_model_dir):
    from k3trt.export.sources import open_model_dir
    from k3trt.verify.task_reference import OfficialModules, flash_reference

    ours = pipe.flash(PROMPT, seed=4, height=64, width=64, output_type="np")
    ref = flash_reference(OfficialModules(open_model_dir(tiny_model_dir), "unet_flash"), PROMPT,
                          height=64, width=64, seed=4)
    db = psnr(ref, ours)
    print(f"Flash vs the official-semantics torch reference: {db:.1f} dB")
    assert db >= E2E_PSNR_DB


@pytest.mark.parametrize("call, match", [
    (lambda p, img, tmp: p.img2img(PROMPT, img, strength=0.0), "strength=0.0"),
    (lambda p, img, tmp: p.img2img(PROMPT, img, strength=0.05, steps=10), "= 0 steps"),
    (lambda p, img, tmp: p.img2img(PROMPT, img[:60]), "not a multiple of 64"),
    (lambda p, img, tmp: p.img2img(["a", "b"], img), "image tasks take one prompt"),
    (lambda p, img, tmp: p.inpaint(PROMPT, img, np.zeros((64, 64))), "mask is 64x64 px but the image is 128x64"),
    (lambda p, img, tmp: p.inpaint(PROMPT, img, np.full((64, 128), 0.5)), "grey"),
    (lambda p, img, tmp: p.inpaint(PROMPT, img, outpaint="right=100"), "not a multiple of 64"),
    (lambda p, img, tmp: p.inpaint(PROMPT, img), "inpainting needs a mask"),
    (lambda p, img, tmp: p.img2img(PROMPT, str(tmp)), "is not an image"),
])
def test_bad_input_fails_before_any_model_runs(pipe, picture, tmp_path, call, match):
    spy = Pipeline(pipe.manifest, BackendSpy(pipe.backend))
    (tmp_path / "x.png").write_text("text")
    with pytest.raises(InvalidArgumentError, match=match):
        call(spy, picture, tmp_path / "x.png")
    assert spy.backend.calls == []


def test_a_task_the_artifacts_were_not_exported_for(artifacts_copy, picture):
    import json

    manifest = json.loads((artifacts_copy / "manifest.json").read_text())
    del manifest["onnx"]["unet_inpainting"]
    (artifacts_copy / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_artifacts(artifacts_copy)
    with pytest.raises(ArtifactError, match="not exported for inpaint: unet_inpainting missing") as err:
        pipe.inpaint(PROMPT, picture, np.ones((64, 128)))
    assert "--components unet_inpainting" in str(err.value)


def test_cli_tasks(tiny_artifacts, picture, tmp_path):
    from k3trt.verify.task_demo import demo_mask
    from k3trt.cli.main import main

    Image.fromarray(picture).save(tmp_path / "in.png")
    Image.fromarray(demo_mask()).save(tmp_path / "mask.png")
    base = ["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a fox", "--steps", "4"]
    assert main([*base, "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--out", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--out", str(tmp_path / "b.png")]) == 0
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a fox", "--flash", "--resolution", "64x64", "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == Image.open(tmp_path / "b.png").size == (128, 64)
    assert main([*base, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "d.png")]) == 2


@pytest.mark.parametrize("task", ["inpaint", "outpaint"])
def test_demo_report_shows_input_mask_and_output(task, tiny_model_dir, tiny_artifacts, tmp_path):
    """The demo's task step on the session's artifacts (the CLI run below adds the preset and the export)."""
    import json

    from k3trt.verify.task_demo import DEMOS

    metrics = DEMOS[task](tiny_model_dir, tiny_artifacts, PROMPT, tmp_path / "report", lambda *_: None)
    assert metrics["ok"] and metrics["psnr_db_vs_reference"] >= E2E_PSNR_DB
    folder = tmp_path / "report"
    tiles = {name: np.asarray(Image.open(folder / f"{name}.png")) for name in
             ("input", "mask", "runtime", "reference", "difference", "preserved")}
    height = 64 if task == "inpaint" else 128  # outpaint: left=64,bottom=64 on the 64 x 128 picture
    assert all(t.shape[:2] == (height, tiles["input"].shape[1]) for t in tiles.values())
    assert set(np.unique(tiles["mask"])) == {0, 255}  # white = repaint, black = keep
    assert Image.open(folder / "compare.png").height >= 256  # enlarged to be looked at
    assert json.loads((folder / "report.json").read_text())["task"] == task
    assert "![compare](compare.png)" in (folder / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["img2img", "inpaint", "outpaint", "flash"])
def test_demo_task_writes_a_report(task, tmp_path, capsys):
    from k3trt.cli.main import main

    assert main(["demo", "--task", task, "--out", str(tmp_path / "demo")]) == 0
    report = tmp_path / "demo" / f"report-{task}"
    assert (report / "report.md").is_file() and (report / "compare.png").is_file()
    assert (report / "runtime.png").is_file() and (report / "reference.png" if task != "img2img" else
                                                   report / "diffusers.png").is_file()
    if task != "flash":
        assert (report / "input.png").is_file()
    if task in ("inpaint", "outpaint"):
        assert (report / "mask.png").is_file()
    assert "report:" in capsys.readouterr().out
