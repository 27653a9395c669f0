"""LoRA without re-export: PEFT adapters trained here, applied by the runtime from the weight map, against
diffusers with the same adapter merged."""
from __future__ import annotations

import json

import numpy as np
import pytest

from k3trt.contract.errors import AdapterError, InvalidArgumentError

from k3trt.verify.lora_training import train_peft_lora

PSNR_MIN_DB = 40.0  # issue 21: runtime with the adapter vs diffusers with it merged, ONNX Runtime fp32
GEN = dict(seed=7, steps=4, guidance=3.0, height=64, width=64)
PROMPT = "a red fox in a snowy forest"


@pytest.fixture(scope="module")
def peft_lora(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "fox-style"
    model = train_peft_lora(tiny_model_dir, folder)
    return folder, model


def _file_hashes(root):
    from k3trt.contract.manifest import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _diffusers_merged(tiny_model_dir, peft_model):
    from k3trt.verify.torch_reference import load_reference, run_reference
    from k3trt.runtime.pipeline import make_request

    pipe = load_reference(tiny_model_dir)
    pipe.unet = peft_model.merge_and_unload()
    return run_reference(pipe, make_request(PROMPT, **GEN), record=False).images


def test_lora_matches_diffusers_merged_then_unloads_to_the_base_bit_for_bit(tiny_artifacts, tiny_model_dir,
                                                                             peft_lora):
    from k3trt.contract.tensor_metrics import psnr
    from k3trt.runtime.pipeline import Pipeline

    folder, model = peft_lora
    before = _file_hashes(tiny_artifacts)
    pipe = Pipeline.from_artifacts(tiny_artifacts, "ort")
    base = pipe.generate(PROMPT, output_type="np", **GEN)
    pipe.set_lora(str(folder))
    adapted = pipe.generate(PROMPT, output_type="np", **GEN)
    pipe.set_lora(None)
    unloaded = pipe.generate(PROMPT, output_type="np", **GEN)

    reference = _diffusers_merged(tiny_model_dir, model)
    assert psnr(reference, adapted) >= PSNR_MIN_DB, psnr(reference, adapted)
    assert psnr(base, adapted) < 30.0, "the adapter must visibly change the image for the check to mean anything"
    assert np.array_equal(unloaded, base)
    assert _file_hashes(tiny_artifacts) == before  # no re-export, nothing written


def test_blend_scales_add_and_zero_scale_is_the_base(tiny_artifacts, peft_lora):
    """Two adapters at 0.5 each give the deltas of one at 1.0; scale 0 leaves every weight bit-exact."""
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.lora import blended_deltas, load_loras, read_initializers, weight_overrides
    from k3trt.runtime.lora_files import read_adapter

    manifest, folder = Manifest.load(tiny_artifacts), str(peft_lora[0])
    half = blended_deltas(manifest, load_loras([f"{folder}:0.5", (folder, 0.5)]))["unet"]
    whole = blended_deltas(manifest, load_loras(folder))["unet"]
    layers = read_adapter(folder).layers
    assert half.keys() == whole.keys() and len(whole) == len(layers) and len(layers) % 4 == 0  # q, k, v, out each
    for name in whole:
        np.testing.assert_allclose(half[name], whole[name], rtol=1e-6, atol=1e-9)
    graph = manifest.onnx("unet").graph.path
    zero = weight_overrides(manifest, {"unet": graph}, load_loras(f"{folder}:0"))["unet"]
    base = read_initializers(manifest, graph, list(zero))
    assert all(np.array_equal(zero[n], base[n]) and zero[n].dtype == base[n].dtype for n in zero)


def _save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_diffusers_and_kohya_single_files_map_like_the_peft_folder(tiny_artifacts, peft_lora, tmp_path):
    from safetensors.numpy import load_file

    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.lora import blended_deltas, load_loras

    manifest, folder = Manifest.load(tiny_artifacts), peft_lora[0]
    peft = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    modules = {k[len("base_model.model."):-len(".lora_A.weight")] for k in peft if k.endswith(".lora_A.weight")}
    diffusers = {}
    kohya = {}
    for m in modules:
        down, up = peft[f"base_model.model.{m}.lora_A.weight"], peft[f"base_model.model.{m}.lora_B.weight"]
        diffusers[f"unet.{m}.lora_A.weight"], diffusers[f"unet.{m}.lora_B.weight"] = down, up
        mangled = "lora_unet_" + m.replace(".", "_")
        kohya[f"{mangled}.lora_down.weight"], kohya[f"{mangled}.lora_up.weight"] = down, up
        kohya[f"{mangled}.alpha"] = np.array(config["lora_alpha"], dtype=np.float32)
    metadata = {"lora_adapter_metadata": json.dumps({"unet": {"r": config["r"], "lora_alpha": config["lora_alpha"]}})}
    expected = blended_deltas(manifest, load_loras(folder))["unet"]
    for path in (_save(tmp_path / "diffusers.safetensors", diffusers, metadata),
                 _save(tmp_path / "kohya.safetensors", kohya)):
        got = blended_deltas(manifest, load_loras(str(path)))["unet"]
        assert got.keys() == expected.keys(), path.name
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name])


def test_unmapped_keys_are_a_typed_error_listing_them(tiny_artifacts, tmp_path):
    from k3trt.contract.manifest import Manifest
    from k3trt.runtime.lora import blended_deltas, load_loras

    rank = np.zeros((2, 64), np.float32)
    bad = _save(tmp_path / "bad.safetensors", {
        "unet.no_such_block.to_q.lora_A.weight": rank, "unet.no_such_block.to_q.lora_B.weight": rank.T.copy(),
        "unet.conv_norm_out.lora_A.weight": rank, "unet.conv_norm_out.lora_B.weight": rank.T.copy()})
    with pytest.raises(AdapterError) as err:
        blended_deltas(Manifest.load(tiny_artifacts), load_loras(str(bad)))
    assert "no_such_block.to_q" in str(err.value) and "conv_norm_out" in str(err.value)
    dora = _save(tmp_path / "dora.safetensors", {"unet.a.lora_A.weight": rank, "unet.a.lora_B.weight": rank.T.copy(),
                                                 "unet.a.lora_magnitude_vector": rank[0]})
    with pytest.raises(AdapterError, match="lora_magnitude_vector"):
        load_loras(str(dora))
    with pytest.raises(AdapterError, match="neither a PEFT adapter folder"):
        load_loras(str(tmp_path / "missing"))
    with pytest.raises(InvalidArgumentError, match="scale"):
        load_loras(f"{bad}:1e9")


def test_rank_and_alpha_patterns_follow_peft(tiny_model_dir, tmp_path):
    """PEFT's own `scaling` per layer, for an adapter with rank_pattern/alpha_pattern, equals ours."""
    from k3trt.runtime.lora_files import read_adapter

    model = train_peft_lora(tiny_model_dir, tmp_path / "patterned", steps=1, rank=4, alpha=8,
                            rank_pattern={"to_q": 2}, alpha_pattern={"to_v": 3})
    ours = {layer.module: layer.scaling for layer in read_adapter(tmp_path / "patterned").layers}
    theirs = {name[len("base_model.model."):]: module.scaling["default"] for name, module in model.named_modules()
              if hasattr(module, "scaling") and "default" in getattr(module, "scaling", {})}
    assert ours == pytest.approx(theirs) and set(ours.values()) == {2.0, 4.0, 0.75}


def test_generate_cli_takes_lora(tiny_artifacts, peft_lora, tmp_path):
    from k3trt.cli.main import main
    from k3trt.runtime.pipeline import Pipeline

    out = tmp_path / "fox.png"
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--prompt", PROMPT, "--resolution", "64x64",
                 "--steps", "2", "--seed", "7", "--lora", f"{peft_lora[0]}:0.7", "--out", str(out)]) == 0
    from PIL import Image

    expected = Pipeline.from_artifacts(tiny_artifacts, "ort", lora=(peft_lora[0], 0.7)).generate(
        PROMPT, seed=7, steps=2, height=64, width=64)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_openvino_runs_the_adapter_as_onnx_runtime_does(tiny_artifacts, peft_lora, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'kandinsky3-trt[openvino]')")
    from k3trt.contract.tensor_metrics import psnr
    from k3trt.runtime.pipeline import Pipeline

    request = dict(seed=7, steps=2, height=64, width=64, output_type="np")
    ort = Pipeline.from_artifacts(tiny_artifacts, "ort", lora=str(peft_lora[0])).generate(PROMPT, **request)
    pipe = Pipeline.from_artifacts(tiny_artifacts, "openvino", cache_dir=tmp_path / "ov", lora=str(peft_lora[0]))
    adapted = pipe.generate(PROMPT, **request)
    pipe.set_lora(None)
    base = pipe.generate(PROMPT, **request)
    assert psnr(ort, adapted) >= PSNR_MIN_DB and psnr(base, adapted) < 30.0
    assert psnr(Pipeline.from_artifacts(tiny_artifacts, "ort").generate(PROMPT, **request), base) >= PSNR_MIN_DB
