"""Trajectory capture: the runtime's own U-Net feeds at every step, cached on disk and reused."""
import numpy as np
import pytest

from k3trt.calibration import collect
from k3trt.calibration.config import TrajectoryConfig
from k3trt.calibration.prompts import PromptSet
from k3trt.contract.manifest import Manifest

PROMPTS = PromptSet("calibration", ("a red fox in the snow", "кот на подоконнике"), "test")


def test_capture_then_reuse_from_cache(artifacts_copy, monkeypatch):
    manifest = Manifest.load(artifacts_copy)
    config = TrajectoryConfig(steps=3, height=64, width=128)
    messages = []
    first = collect.collect(manifest, PROMPTS, config, threads=2, log=messages.append)
    assert all(f.path.is_file() for f in first.files) and "running the fp32 pipeline" in messages[-1] and " for 2 (" in messages[-1]
    arrays = first.files[1].load()
    assert arrays["unet__sample"].shape == (3, 2, 4, 8, 16)  # every step, [uncond, cond] batched
    assert arrays["unet__timestep"][:, 0].tolist() == sorted(arrays["unet__timestep"][:, 0], reverse=True)
    mask = arrays["unet__encoder_attention_mask"]
    assert mask[0].sum() == 0 and mask[1].sum() > 0  # unconditional half: all-zero mask
    assert arrays["text_encoder__input_ids"].dtype == np.int32
    assert arrays["movq_decoder__latents"].shape == (1, 4, 8, 16) and arrays["image"].shape == (1, 64, 128, 3)

    def no_pipeline(*_args, **_kwargs):
        raise AssertionError("a cached trajectory was recomputed")

    monkeypatch.setattr(collect, "fp32_pipeline", no_pipeline)
    again = collect.collect(manifest, PROMPTS, config, log=messages.append)
    assert "reusing cached trajectories for all 2 prompts" in messages[-1]
    assert [f.path for f in again.files] == [f.path for f in first.files] and again.key() == first.key()
    other = collect.plan(manifest, PROMPTS, TrajectoryConfig(steps=4, height=64, width=128))
    assert not set(f.path for f in other.files) & set(f.path for f in first.files)  # steps are in the key


def test_calibration_prompts_skip_the_decode_and_keep_the_same_unet_calls(artifacts_copy, monkeypatch):
    """decode=False (calibration prompts) records the same U-Net calls and final latents without running the
    MoVQ decoder, under its own cache key; asking it for images is a typed error."""
    from k3trt.contract.errors import ArtifactError

    manifest = Manifest.load(artifacts_copy)
    config, prompts = TrajectoryConfig(steps=2, height=64, width=64), PromptSet("c", PROMPTS.prompts[:1], "t")
    decoded = collect.collect(manifest, prompts, config, log=lambda *_: None)
    real_pipeline = collect.fp32_pipeline
    decoder_calls = []

    def counting_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        run = pipe.backend.run
        pipe.backend.run = lambda c, f: (decoder_calls.append(c) if c == "movq_decoder" else None) or run(c, f)
        return pipe

    monkeypatch.setattr(collect, "fp32_pipeline", counting_pipeline)
    latent_only = collect.collect(manifest, prompts, config, decode=False, log=lambda *_: None)
    assert decoder_calls == [] and latent_only.files[0].path != decoded.files[0].path
    ours, theirs = latent_only.files[0].load(), decoded.files[0].load()
    assert "image" not in ours and "image" in theirs
    for name in ("unet__sample", "unet__noise_pred", "movq_decoder__latents"):
        np.testing.assert_array_equal(ours[name], theirs[name])
    with pytest.raises(ArtifactError, match="without images"):
        latent_only.images()


def test_recorded_feeds_reproduce_the_recorded_output(artifacts_copy):
    """The cached inputs are exactly what the U-Net saw: rerunning them gives the cached noise prediction."""
    import onnxruntime as ort

    manifest = Manifest.load(artifacts_copy)
    traj = collect.collect(manifest, PromptSet("c", PROMPTS.prompts[:1], "t"),
                           TrajectoryConfig(steps=2, height=64, width=64), log=lambda *_: None)
    session = ort.InferenceSession(str(manifest.path(manifest.onnx("unet").graph.path)),
                                   providers=["CPUExecutionProvider"])
    calls = list(traj.unet_calls())
    assert [c.step for c in calls] == [0, 1]
    for call in calls:
        out = session.run(["noise_pred"], call.feeds)[0]
        np.testing.assert_allclose(out, call.noise_pred, rtol=1e-4, atol=1e-5)


def test_invalid_trajectory_settings_are_typed_errors():
    from k3trt.contract.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="multiple of 64"):
        TrajectoryConfig(height=100)
    with pytest.raises(InvalidArgumentError, match="1..1000"):
        TrajectoryConfig(steps=0)
