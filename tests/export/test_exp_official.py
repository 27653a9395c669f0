"""The official `.pt` checkpoint layout: key mapping proven against the official modules' recorded outputs,
typed errors for unmapped keys and unsafe pickles, and a random official checkpoint that exports and generates."""
from __future__ import annotations

import pickle

import pytest
import torch

from official_helpers import TINY_OVERRIDES, fill_random, layout, write_official_dir


def _mapped_unet(component: str):
    from k3trt.export.official import infer_unet_config
    from k3trt.export.official_keys import remap, unet_key
    from k3trt.export.model_variants import build_unet

    state = fill_random(component, 0)
    config, channels = infer_unet_config(state, {"0.weight": torch.zeros(64, 64)}, TINY_OVERRIDES["unet"])
    unet = build_unet(config, channels)
    target = unet.state_dict()
    mapped = remap(state, unet_key, target, what=component,
                   allowed_missing=tuple(k for k in target if k.startswith("encoder_hid_proj.")))
    missing, _ = unet.load_state_dict(mapped, strict=False)
    assert all(k.startswith("encoder_hid_proj.") for k in missing)
    unet.encoder_hid_proj = torch.nn.Identity()  # the official U-Net takes the projected context
    return unet, channels


@pytest.mark.parametrize("component", ["unet", "unet_inpainting"])
def test_unet_mapping_reproduces_the_official_unet(component):
    unet, channels = _mapped_unet(component)
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, channels, 8, 8, generator=gen), torch.randn(1, 5, 64, generator=gen)
    with torch.no_grad():
        got = unet(x, torch.tensor([250.0]), encoder_hidden_states=ctx,
                   encoder_attention_mask=torch.tensor([[1.0, 1, 1, 0, 0]])).sample
    want = torch.tensor(layout()[component]["output"]).reshape(got.shape)
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max())


def test_movq_mapping_reproduces_the_official_movq(tmp_path):
    from k3trt.export.official import OfficialSource

    torch.save(fill_random("movq", 0), tmp_path / "movq.pt")
    movq = OfficialSource(tmp_path, "test")._load_movq()
    gen = torch.Generator().manual_seed(1)
    image, z = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(1, 4, 2, 2, generator=gen)
    with torch.no_grad():
        encoded, decoded = movq.encode(image).latents, movq.decode(z, force_not_quantize=True).sample
    data = layout()["movq"]
    assert torch.allclose(encoded.flatten(), torch.tensor(data["encoded"]), atol=1e-5)
    assert torch.allclose(decoded.flatten(), torch.tensor(data["decoded"]), atol=1e-5)


@pytest.fixture(scope="module")
def official_dir(tiny_model_dir, tmp_path_factory):
    return write_official_dir(tmp_path_factory.mktemp("official") / "weights", tiny_model_dir)


def test_unmatched_keys_are_listed(official_dir, tmp_path):
    import shutil

    from k3trt.export.official_keys import UnmappedKeysError
    from k3trt.export.sources import open_source_dir

    broken = tmp_path / "broken"
    shutil.copytree(official_dir, broken)
    checkpoint = torch.load(broken / "kandinsky3.pt", weights_only=True)
    checkpoint["unet"]["in_layer.extra_weight"] = checkpoint["unet"].pop("out_layer.2.bias")
    torch.save(checkpoint, broken / "kandinsky3.pt")
    with pytest.raises(UnmappedKeysError) as err:
        open_source_dir(broken).load("unet")
    assert "in_layer.extra_weight" in str(err.value) and "conv_out.bias" in str(err.value)
    assert err.value.unmatched and err.value.missing


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_a_pickle_that_needs_code_execution_is_refused(tmp_path):
    from k3trt.export.official import safe_torch_load
    from k3trt.contract.errors import ModelSourceError

    marker = tmp_path / "pwned"
    path = tmp_path / "movq.pt"
    with open(path, "wb") as handle:
        torch.save({"unet": _RunsCode(marker)}, handle, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ModelSourceError, match="code execution"):
        safe_torch_load(path)
    assert not marker.exists()


def test_a_random_official_checkpoint_exports_and_generates(official_dir, tmp_path):
    from k3trt.export.sources import open_source_dir
    from k3trt.export.writer import export_artifacts
    from k3trt.runtime.pipeline import Pipeline

    source = open_source_dir(official_dir.parent)  # the repository root with weights/ inside is accepted too
    assert source.folders() == ["text_encoder", "unet", "unet_inpainting", "unet_flash", "movq"]
    summary = export_artifacts(source, tmp_path / "art", components=("text_encoder", "unet", "movq_decoder"),
                               log=lambda *_: None)
    assert summary["exported"] == ["text_encoder", "unet", "movq_decoder"]
    images = Pipeline.from_artifacts(tmp_path / "art").generate("a red fox", steps=2, height=64, width=64,
                                                              output_type="np")
    assert images.shape == (1, 64, 64, 3) and float(images.std()) > 0
