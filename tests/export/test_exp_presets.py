"""Presets: deterministic random weights, exact damping, a tokenizer that agrees with sentencepiece, a folder
diffusers loads, and the full configuration's sizes (item 8)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from k3trt.export.presets import DAMPING, PRESETS, SCHEDULER_CONFIG, damp_residual_branches, describe_full, write_preset

WEIGHTS = {"text_encoder": "text_encoder/model.safetensors",
           "unet": "unet/diffusion_pytorch_model.safetensors",
           "movq": "movq/diffusion_pytorch_model.safetensors"}

LINES = [
    "a red cat sitting on a blue chair",
    "A photograph of an astronaut riding a horse, 4k, highly detailed",
    "Ünïcödé  text,\twith tabs — and dashes",
    "",
    "word " * 200,  # longer than 128 tokens: truncated
]


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """The tiny preset written again with seed 0 (damped), seed 1, and seed 0 undamped."""
    root = tmp_path_factory.mktemp("presets")
    return {
        "again": write_preset("tiny", root / "again", seed=0),
        "seed1": write_preset("tiny", root / "seed1", seed=1),
        "undamped": write_preset("tiny", root / "undamped", seed=0, damped=False),
    }


def tensors(folder, component) -> dict:
    return load_file(folder / WEIGHTS[component])


def test_same_seed_gives_identical_weights_and_configs(tiny_model_dir, presets):
    again = presets["again"]
    for component, rel in WEIGHTS.items():
        assert (again / rel).read_bytes() == (tiny_model_dir / rel).read_bytes(), component
    for rel in ("model_index.json", "unet/config.json", "movq/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json", "tokenizer/tokenizer.json", "k3trt_preset.json"):
        assert (again / rel).read_bytes() == (tiny_model_dir / rel).read_bytes(), rel


def test_same_seed_gives_the_same_sentencepiece_vocabulary(tiny_model_dir, presets):
    import sentencepiece as spm

    a = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer" / "spiece.model"))
    b = spm.SentencePieceProcessor(model_file=str(presets["again"] / "tokenizer" / "spiece.model"))
    assert a.get_piece_size() == b.get_piece_size()
    assert [(a.id_to_piece(i), a.get_score(i)) for i in range(a.get_piece_size())] == \
        [(b.id_to_piece(i), b.get_score(i)) for i in range(b.get_piece_size())]


def test_same_seed_gives_a_byte_identical_folder(tiny_model_dir, presets):
    rel = "tokenizer/spiece.model"
    assert (presets["again"] / rel).read_bytes() == (tiny_model_dir / rel).read_bytes()


def test_different_seeds_differ(tiny_model_dir, presets):
    for component in WEIGHTS:
        a, b = tensors(tiny_model_dir, component), tensors(presets["seed1"], component)
        assert a.keys() == b.keys()
        random = [k for k in a if a[k].numel() > 16 and a[k].std() > 0]  # not the constant-initialized ones
        differing = [k for k in random if not torch.equal(a[k], b[k])]
        assert len(differing) == len(random) > 0, (component, set(random) - set(differing))
    stamp = json.loads((presets["seed1"] / "k3trt_preset.json").read_text())
    assert stamp["seed"] == 1 and stamp["key"] != json.loads((tiny_model_dir / "k3trt_preset.json").read_text())["key"]
    # the tokenizer does not depend on the seed
    assert (presets["seed1"] / "tokenizer/tokenizer.json").read_bytes() == \
        (tiny_model_dir / "tokenizer/tokenizer.json").read_bytes()


def residual_branch_ends(unet) -> list[str]:
    """Module names of the last layer of each residual branch, found independently of presets.py."""
    from diffusers.models.unets.unet_kandinsky3 import Kandinsky3AttentionBlock, Kandinsky3ResNetBlock

    names = []
    for name, module in unet.named_modules():
        if isinstance(module, Kandinsky3ResNetBlock):
            names.append(f"{name}.resnet_blocks.{len(module.resnet_blocks) - 1}.projection")
        elif isinstance(module, Kandinsky3AttentionBlock):
            names += [f"{name}.attention.to_out.0", f"{name}.feed_forward.2"]
    return names


def test_damped_and_undamped_differ_exactly_in_the_scaled_layers(tiny_model_dir, presets):
    from diffusers import Kandinsky3UNet

    undamped = presets["undamped"]
    for component in ("text_encoder", "movq"):  # same seed: only the U-Net is touched
        assert (undamped / WEIGHTS[component]).read_bytes() == (tiny_model_dir / WEIGHTS[component]).read_bytes()
    damped, raw = tensors(tiny_model_dir, "unet"), tensors(undamped, "unet")
    assert damped.keys() == raw.keys()

    unet = Kandinsky3UNet.from_config(json.loads((tiny_model_dir / "unet" / "config.json").read_text()))
    layers = residual_branch_ends(unet)
    expected = {f"{layer}.{p}" for layer in layers for p, _ in unet.get_submodule(layer).named_parameters()}
    differing = {k for k in damped if not torch.equal(damped[k], raw[k])}
    assert differing == expected
    for key in expected:
        assert torch.equal(damped[key], raw[key] * DAMPING), key
    assert damp_residual_branches(unet) == len(layers) > 0  # counts every scaled layer, nothing else

    assert json.loads((undamped / "k3trt_preset.json").read_text())["damping"] is None
    assert json.loads((tiny_model_dir / "k3trt_preset.json").read_text())["damping"] == DAMPING


def test_tokenizer_matches_sentencepiece(tiny_model_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    reference = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer" / "spiece.model"))
    assert len(tokenizer) == reference.get_piece_size()  # transformers 5 can build a 4-token vocabulary
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for line in LINES:
        expected = reference.encode(line)
        assert tokenizer(line, add_special_tokens=False).input_ids == expected, line
        assert tokenizer(line).input_ids == expected + [1], line  # T5 appends </s>
    assert any(len(reference.encode(line)) > 5 for line in LINES)


def test_artifact_tokenizer_json_pads_like_transformers(tiny_model_dir, tiny_artifacts):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from k3trt.contract.manifest import Manifest

    manifest = Manifest.load(tiny_artifacts)
    fast = Tokenizer.from_file(str(manifest.path(manifest.file_record("tokenizer").path)))
    fast.enable_padding(pad_id=manifest.data["tokenizer"]["pad_id"], pad_token="<pad>", length=128)
    fast.enable_truncation(max_length=128)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    expected = tokenizer(LINES, padding="max_length", max_length=128, truncation=True)
    got = fast.encode_batch(LINES)
    for line, enc, ids, mask in zip(LINES, got, expected.input_ids, expected.attention_mask):
        assert enc.ids == ids, line
        assert enc.attention_mask == mask, line
        assert len(enc.ids) == 128
    assert sum(expected.attention_mask[-1]) == 128 and expected.input_ids[-1][-1] == 1  # truncated, ends in </s>
    assert sum(expected.attention_mask[3]) == 1  # the empty prompt is just </s>


def test_diffusers_pipeline_loads_the_preset(tiny_model_dir):
    from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet, VQModel
    from transformers import T5EncoderModel

    pipe = Kandinsky3Pipeline.from_pretrained(str(tiny_model_dir))
    assert isinstance(pipe.unet, Kandinsky3UNet) and isinstance(pipe.movq, VQModel)
    assert isinstance(pipe.text_encoder, T5EncoderModel) and isinstance(pipe.scheduler, DDPMScheduler)
    spec = PRESETS["tiny"]
    assert tuple(pipe.unet.config.block_out_channels) == spec.unet["block_out_channels"]
    assert pipe.text_encoder.config.d_model == spec.t5["d_model"] == pipe.unet.config.encoder_hid_dim
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    for key, value in SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value, key


def test_describe_full_sizes():
    sizes = describe_full()
    assert set(sizes) == {"text_encoder", "unet", "movq"}
    assert 2.9e9 < sizes["unet"]["parameters"] < 3.2e9  # 3.06 B
    assert 2.5e8 < sizes["movq"]["parameters"] < 2.9e8  # 0.27 B
    assert 8.0e9 < sizes["text_encoder"]["parameters"] < 9.2e9  # FLAN-UL2 encoder, 8.6 B + embeddings
    for entry in sizes.values():
        assert entry["fp16_gb"] == pytest.approx(entry["parameters"] * 2 / 1e9, abs=0.01)
        assert entry["fp32_gb"] == pytest.approx(2 * entry["fp16_gb"], abs=0.02)
