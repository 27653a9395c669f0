"""Presets: random-weight Kandinsky 3 models of the real classes, written in the real diffusers layout.

One loader then serves presets and downloaded checkpoints alike. Weights come from a fixed seed. By default
the last layer of every U-Net residual branch (res-block output conv, attention output projection,
feed-forward output) is scaled by 0.1 ("damped"): random-init Kandinsky 3 U-Nets amplify perturbations far
more than trained ones, and damped branches behave like a trained network's small residual contributions,
so fp16/int8 studies on presets mean something. `damped=False` keeps the raw random init.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

from k3trt.contract.arguments import check_seed
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.manifest import sha256_json
from k3trt.runtime.seeding import seed_everything
from k3trt.writing.ownership import check_output_dir, install_dir, staging_sibling

CORPUS = Path(__file__).with_name("assets") / "tokenizer_corpus.txt"
PRESET_FORMAT = 4  # bump when preset construction changes, so caches rebuild (4: inpainting + Flash U-Nets)
DAMPING = 0.1

SCHEDULER_CONFIG = dict(  # kandinsky-community/kandinsky-3 scheduler/scheduler_config.json
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
    prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0, thresholding=False,
    timestep_spacing="leading", steps_offset=1, variance_type="fixed_small",
)


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    name: str
    vocab_size: int  # sentencepiece pieces; `full` uses T5's 32128
    t5: dict
    unet: dict
    movq: dict
    native_size: int  # image side in pixels the preset is sized for


def _movq(channels: tuple[int, ...], groups: int, layers: int, codes: int) -> dict:
    # diffusers' SpatialNorm hard-codes 32 groups, so MoVQ channels are multiples of 32 even in presets.
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=codes,
        block_out_channels=list(channels), layers_per_block=layers, norm_num_groups=groups, norm_type="spatial",
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3, act_fn="silu",
    )


def _t5(d_model: int, layers: int, heads: int, d_kv: int, d_ff: int) -> dict:
    return dict(d_model=d_model, num_layers=layers, num_heads=heads, d_kv=d_kv, d_ff=d_ff,
                feed_forward_proj="gated-silu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)


PRESETS = {
    "tiny": PresetSpec(
        "tiny", 384, _t5(64, 2, 2, 32, 128),
        dict(block_out_channels=(32, 64, 64, 128), layers_per_block=2, groups=8, attention_head_dim=16,
             time_embedding_dim=64, cross_attention_dim=64, encoder_hid_dim=64),
        _movq((32, 32, 64, 64), 32, 1, 64), native_size=64),
    "small": PresetSpec(
        "small", 1024, _t5(256, 4, 4, 64, 1024),
        dict(block_out_channels=(64, 128, 256, 512), layers_per_block=2, groups=16, attention_head_dim=32,
             time_embedding_dim=256, cross_attention_dim=256, encoder_hid_dim=256),
        _movq((64, 128, 128, 256), 32, 1, 256), native_size=256),
    "full": PresetSpec(  # kandinsky-community/kandinsky-3 configuration; built on the meta device only
        "full", 32128, _t5(4096, 32, 16, 256, 16384),
        dict(block_out_channels=(384, 768, 1536, 3072), layers_per_block=3, groups=32, attention_head_dim=64,
             time_embedding_dim=1536, cross_attention_dim=4096, encoder_hid_dim=4096),
        _movq((256, 512, 512, 1024), 32, 2, 16384), native_size=1024),
}


def preset_spec(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name!r}", accepted=", ".join(PRESETS),
                                   fix="use --preset tiny (tests, seconds) or --preset small (CPU benchmarks)")
    return PRESETS[name]


def preset_key(spec: PresetSpec, *, seed: int, damped: bool) -> str:
    return sha256_json([dataclasses.asdict(spec), seed, damped, PRESET_FORMAT,
                        CORPUS.read_bytes().decode()])[:16]


# ----------------------------------------------------------------------------------------- building
def train_tokenizer(folder: Path, vocab_size: int) -> None:
    """Train a T5-style sentencepiece model (pad 0, eos 1, unk 2) on the shipped corpus into `folder`."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()  # written from memory: no temporary path or corpus location lands in the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text().splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())


def _randomize_time_conditioning(unet, std: float = 0.02) -> None:
    """diffusers zero-inits the conditional GroupNorm MLPs (trained weights replace them). Left at zero, a
    random preset would ignore the timestep entirely; small random values keep the time path exercised."""
    import torch

    for name, module in unet.named_modules():
        if name.endswith("context_mlp.1"):
            torch.nn.init.normal_(module.weight, std=std)
            torch.nn.init.normal_(module.bias, std=std)


def damp_residual_branches(unet, factor: float = DAMPING) -> int:
    """Scale the last layer of each residual branch by `factor`; returns how many layers were scaled."""
    import torch
    from diffusers.models.unets.unet_kandinsky3 import (
        Kandinsky3AttentionBlock,
        Kandinsky3ResNetBlock,
    )

    last_layers = []
    for module in unet.modules():
        if isinstance(module, Kandinsky3ResNetBlock):
            last_layers.append(module.resnet_blocks[-1].projection)
        elif isinstance(module, Kandinsky3AttentionBlock):
            last_layers += [module.attention.to_out[0], module.feed_forward[2]]
    with torch.no_grad():
        for layer in last_layers:
            layer.weight.mul_(factor)
            if layer.bias is not None:
                layer.bias.mul_(factor)
    return len(last_layers)


def build_models(spec: PresetSpec, *, vocab_size: int, seed: int, damped: bool):
    """The three torch components of a preset, from a fixed seed (fp32, eval mode)."""
    from diffusers import Kandinsky3UNet, VQModel
    from transformers import T5Config, T5EncoderModel

    seed_everything(seed)  # all 64 bits count (torch.manual_seed keeps 32)
    text_encoder = T5EncoderModel(T5Config(vocab_size=vocab_size, **spec.t5)).eval()
    unet = Kandinsky3UNet(in_channels=4, **spec.unet).eval()
    _randomize_time_conditioning(unet)
    if damped:
        damp_residual_branches(unet)
    movq = VQModel(**spec.movq).eval()
    return text_encoder, unet, movq


def build_variant_unets(spec: PresetSpec, *, seed: int, damped: bool) -> dict:
    """The inpainting (9-channel) and Flash U-Nets with their null embeddings, from their own seed so the
    base components stay bit-identical to earlier presets. folder -> (unet, null_embedding, sample_channels)."""
    import torch
    from k3trt.export.model_variants import VARIANT_FOLDERS, build_unet

    out = {}
    for offset, (folder, channels) in enumerate(VARIANT_FOLDERS.items(), start=1):
        seed_everything((seed + 1000 * offset) % 2**64)  # all 64 bits of the seed count
        unet = build_unet(dict(spec.unet), channels)
        _randomize_time_conditioning(unet)
        if damped:
            damp_residual_branches(unet)
        out[folder] = (unet, torch.randn(spec.unet["cross_attention_dim"]), channels)
    return out


def check_preset_request(name: str, out, *, seed: int = 0, force: bool = False) -> Path:
    """Everything `write_preset` needs, checked before any work: the name, the seed, the output folder (new,
    empty, or a preset k3trt wrote, replaced only with `force`)."""
    preset_spec(name)
    if name == "full":
        raise InvalidArgumentError("preset 'full' has no weights and cannot be written to disk",
                                   accepted="tiny, small",
                                   fix="use `k3trt preset full --describe` for its shapes and sizes")
    check_seed(seed, "seed")
    return check_output_dir(out, "preset", replace=True, force=force)


def write_preset(name: str, out: str | os.PathLike, *, seed: int = 0, damped: bool = True,
                 force: bool = False) -> Path:
    """Write preset `name` as a diffusers folder (Kandinsky3Pipeline.save_pretrained) at `out`, atomically.

    `out` must be new, empty, or a preset k3trt wrote (replaced only with `force`): nothing else is deleted."""
    out = check_preset_request(name, out, seed=seed, force=force)
    spec = preset_spec(name)
    from diffusers import DDPMScheduler, Kandinsky3Pipeline
    from transformers import T5Tokenizer

    staging = staging_sibling(out)
    try:
        train_tokenizer(staging / "spm", spec.vocab_size)
        tokenizer = T5Tokenizer.from_pretrained(str(staging / "spm"), extra_ids=0)
        text_encoder, unet, movq = build_models(spec, vocab_size=len(tokenizer), seed=seed, damped=damped)
        pipe = Kandinsky3Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
                                  scheduler=DDPMScheduler(**SCHEDULER_CONFIG), movq=movq)
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        from k3trt.export.model_variants import save_variant

        for folder, (variant, null, channels) in build_variant_unets(spec, seed=seed, damped=damped).items():
            save_variant(staging / "model" / folder, variant, null, sample_channels=channels)
        shutil.copy(staging / "spm" / "spiece.model", staging / "model" / "tokenizer" / "spiece.model")
        stamp = dict(preset=name, seed=seed, damped=damped, key=preset_key(spec, seed=seed, damped=damped),
                     damping=DAMPING if damped else None)
        (staging / "model" / "k3trt_preset.json").write_text(json.dumps(stamp, indent=2))
        install_dir(staging / "model", out, "preset")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("K3TRT_CACHE", Path.home() / ".cache" / "k3trt"))


def cached_preset(name: str, *, seed: int = 0, damped: bool = True, log=print) -> Path:
    """The preset's diffusers folder in the cache, built on first use (keyed by config, seed and damping)."""
    spec = preset_spec(name)
    key = preset_key(spec, seed=seed, damped=damped)
    folder = cache_root() / "presets" / f"{name}-{key}"
    stamp = folder / "k3trt_preset.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return folder
    log(f"building preset {name!r} (seed {seed}, {'damped' if damped else 'undamped'}) -> {folder}")
    return write_preset(name, folder, seed=seed, damped=damped, force=True)  # the cache's own folder


def describe_full() -> dict:
    """Parameter counts and fp16 sizes of the real configuration, built on the meta device (no memory)."""
    import torch

    spec = PRESETS["full"]
    with torch.device("meta"):
        models = build_models(spec, vocab_size=spec.vocab_size, seed=0, damped=False)
    out = {}
    for label, model in zip(("text_encoder", "unet", "movq"), models):
        count = sum(p.numel() for p in model.parameters())
        out[label] = dict(parameters=count, fp16_gb=round(count * 2 / 1e9, 2), fp32_gb=round(count * 4 / 1e9, 2))
    return out
