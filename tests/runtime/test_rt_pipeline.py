"""End-to-end: the lean runtime on ONNX Runtime against diffusers.Kandinsky3Pipeline on the tiny preset."""
import logging

import numpy as np
import pytest
import torch

from k3trt.runtime import Pipeline
from k3trt.contract.errors import ArtifactError, InvalidArgumentError, NonFiniteError, ShapeError
from k3trt.contract.tensor_metrics import psnr
from k3trt.runtime.pipeline import GenerationCancelled

E2E_PSNR_DB = 40.0  # fp32 bound from the runtime issue; measured ~120 dB on the damped tiny preset


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from k3trt.verify.torch_reference import load_reference

    return load_reference(tiny_model_dir)


def _reference_images(reference, prompt, negative, *, seed, steps, guidance, height, width, num_images):
    out = reference(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                    height=height, width=width, num_images_per_prompt=num_images,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return out.images


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("negative", [None, ["blurry, low quality", "плохое качество"]])
def test_end_to_end_matches_diffusers(pipe, reference, guidance, negative):
    prompts = ["a red fox in a snowy forest, watercolor", "кот сидит на окне при свете луны"]
    kwargs = dict(seed=11, steps=6, guidance=guidance, height=64, width=128, num_images=2)
    ours = pipe.generate(prompts, negative, output_type="np", **kwargs)
    ref = _reference_images(reference, prompts, negative, **kwargs)
    assert ours.shape == ref.shape == (4, 64, 128, 3)
    assert psnr(ref, ours) >= E2E_PSNR_DB
    assert np.std(ours) > 0.01  # not a blank image


def test_seed_determinism_and_pil_output(pipe):
    a = pipe.generate("a lighthouse", seed=1, steps=3, height=64, width=64)
    b = pipe.generate("a lighthouse", seed=1, steps=3, height=64, width=64)
    c = pipe.generate("a lighthouse", seed=2, steps=3, height=64, width=64)
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_callback_sees_every_step_and_can_cancel(pipe):
    seen = []
    pipe.generate("a cat", steps=4, height=64, width=64, callback=lambda info: seen.append(info.timestep))
    assert seen == [751, 501, 251, 1]
    with pytest.raises(GenerationCancelled, match="after step 2/4"):
        pipe.generate("a cat", steps=4, height=64, width=64, callback=lambda info: info.index == 1)


def test_size_rounds_up_like_diffusers(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="k3trt"):
        images = pipe.generate("a cat", steps=1, height=70, width=64, output_type="np")
    assert images.shape[1:3] == (128, 64)
    assert "will be 128 px" in caplog.text


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps=0"), (dict(guidance=-1.0), "guidance=-1.0"), (dict(num_images=0), "num_images=0"),
    (dict(prompt=[]), "empty"), (dict(prompt=3), "not a string"), (dict(output_type="pt"), "output_type"),
    (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1"),
])
def test_bad_requests_are_typed_errors(pipe, kwargs, match):
    args = {"prompt": "a cat", "steps": 2, "height": 64, "width": 64, **kwargs}
    with pytest.raises(InvalidArgumentError, match=match) as info:
        pipe.generate(args.pop("prompt"), **args)
    assert "accepted" in str(info.value)


def test_latent_output_is_what_the_decoder_would_read(pipe):
    """output_type="latent" stops before the MoVQ decoder (calibration records trajectories this way)."""
    decodes = len(pipe.backend.timings["movq_decoder"])
    latents = pipe.generate("a cat", seed=3, steps=2, height=64, width=64, output_type="latent")
    assert latents.shape == (1, 4, 8, 8) and len(pipe.backend.timings["movq_decoder"]) == decodes
    images = pipe.generate("a cat", seed=3, steps=2, height=64, width=64, output_type="np")
    np.testing.assert_array_equal(pipe.decode(torch.from_numpy(latents)), images)


def test_shapes_outside_the_artifacts_fail_before_any_work(pipe):
    calls_before = len(pipe.backend.timings["text_encoder"])
    with pytest.raises(ShapeError, match="height 2112 px is outside") as info:
        pipe.generate("a cat", steps=2, height=2112, width=64)
    assert "64..2048 px" in str(info.value)  # stated in pixels (the U-Net's latent range 8..256, x 8)
    assert len(pipe.backend.timings["text_encoder"]) == calls_before


def test_nan_from_a_stage_names_the_stage(tiny_artifacts):
    pipe = Pipeline.from_artifacts(tiny_artifacts, "ort")
    real = pipe.backend._run

    def poisoned(component, feeds):
        out = real(component, feeds)
        if component == "unet":
            out["noise_pred"][0, 0, 0, 0] = float("nan")
        return out

    pipe.backend._run = poisoned
    with pytest.raises(NonFiniteError, match="unet at step 0"):
        pipe.generate("a cat", steps=2, height=64, width=64)


def test_tampered_and_missing_artifacts(artifacts_copy):
    from k3trt.contract.manifest import Manifest

    manifest = Manifest.load(artifacts_copy)
    tok = manifest.path(manifest.data["tokenizer"]["path"])
    tok.write_text(tok.read_text().replace("<pad>", "<pod>", 1))
    with pytest.raises(ArtifactError, match="was modified"):
        Pipeline.from_artifacts(artifacts_copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        Pipeline.from_artifacts(artifacts_copy / "nope")


def test_runtime_never_imports_model_code(tiny_artifacts):
    """The lean runtime generates with no diffusers/transformers module loaded (fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; from k3trt.runtime import Pipeline; "
            f"Pipeline.from_artifacts({str(tiny_artifacts)!r}).generate('a cat', steps=1, height=64, width=64); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
