"""Key mapping: the official Kandinsky 3 / 3.1 `.pt` state dicts -> the diffusers classes' state dicts.

Written from reading, not imported:
- U-Net: diffusers `pipelines/kandinsky3/convert_kandinsky3_unet.py` (its MAPPING and DYNAMIC_MAP), checked
  against the official `kandinsky3/model/unet.py` (ai-forever/Kandinsky-3).
- Text projection: the official `T5TextConditionEncoder.projection` (`nn.Sequential(Linear, LayerNorm)` in
  `kandinsky3/condition_encoders.py`) is diffusers' `Kandinsky3UNet.encoder_hid_proj`.
- MoVQ: the official `kandinsky3/movq.py` (taming-transformers naming: `down.i.block.j`, `mid.block_1`,
  `up.i` with `up` stored lowest-resolution-last) against diffusers `VQModel` (`down_blocks`, `mid_block`,
  `up_blocks` stored lowest-resolution-first, attention as Linear layers where the official code has 1x1 convs).

Every official key must land on a diffusers key of the same shape, and every diffusers key must be filled (except
the few listed in `allowed_missing`); anything else is a typed error that lists the keys.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

from k3trt.contract.errors import ModelSourceError

SHOWN = 12  # how many unmatched keys an error message lists before "... and N more"


class UnmappedKeysError(ModelSourceError):
    """Official checkpoint keys that do not map onto the diffusers class (or diffusers keys left unfilled)."""

    def __init__(self, what: str, *, unmatched: list[str], missing: list[str], mismatched: list[str]):
        self.unmatched, self.missing, self.mismatched = unmatched, missing, mismatched
        parts = []
        for label, keys in (("unmatched checkpoint keys", unmatched), ("diffusers keys left unfilled", missing),
                            ("shape mismatches", mismatched)):
            if keys:
                more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:SHOWN])}{more}")
        super().__init__(f"{what}: " + "; ".join(parts),
                         accepted="a state dict in the official ai-forever/Kandinsky-3 key layout",
                         fix="check the file is the right component (U-Net, inpainting U-Net, Flash U-Net, MoVQ, "
                             "projection) of an official Kandinsky 3 / 3.1 checkpoint")


# ----------------------------------------------------------------------------------------- U-Net
_UNET_RULES: tuple[tuple[str, str | Callable], ...] = (
    (r"^to_time_embed\.1\.", "time_embedding.linear_1."),
    (r"^to_time_embed\.3\.", "time_embedding.linear_2."),
    (r"^in_layer\.", "conv_in."),
    (r"^out_layer\.0\.", "conv_norm_out."),
    (r"^out_layer\.2\.", "conv_out."),
    (r"^feature_pooling\.", "add_time_condition."),
    (r"^down_samples\.", "down_blocks."),
    (r"^up_samples\.", "up_blocks."),
    (r"\.self_attention_block\.", ".attentions.0."),
    # each official level holds (in-resnet, cross-attention, out-resnet) triples; diffusers keeps three lists,
    # with the level's self-attention first in `attentions`, hence the +1
    (r"\.resnet_attn_blocks\.(\d+)\.0\.", lambda m: f".resnets_in.{m[1]}."),
    (r"\.resnet_attn_blocks\.(\d+)\.1\.", lambda m: f".attentions.{int(m[1]) + 1}."),
    (r"\.resnet_attn_blocks\.(\d+)\.2\.", lambda m: f".resnets_out.{m[1]}."),
    (r"\.to_query\.", ".to_q."),
    (r"\.to_key\.", ".to_k."),
    (r"\.to_value\.", ".to_v."),
    (r"\.output_layer\.", ".to_out.0."),
)

_PROJECTION_RULES = ((r"^0\.", "encoder_hid_proj.projection_linear."),
                     (r"^1\.", "encoder_hid_proj.projection_norm."))


def _apply(rules, key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def unet_key(key: str) -> str:
    return _apply(_UNET_RULES, key)


def projection_key(key: str) -> str:
    return _apply(_PROJECTION_RULES, key)


# ----------------------------------------------------------------------------------------- MoVQ
_MOVQ_BLOCK = {"block": "resnets", "attn": "attentions"}
_MOVQ_MID = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}
_ATTN_LINEAR = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _movq_structure(key: str, levels: int) -> str:
    """Level/block names; the decoder's `up` list is stored in the opposite order to diffusers' `up_blocks`."""
    m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)$", key)
    if m:
        part, direction, level, kind, rest = m.groups()
        level = int(level) if direction == "down" else levels - 1 - int(level)
        if kind in ("downsample", "upsample"):
            return f"{part}.{direction}_blocks.{level}.{kind}rs.0.{rest}"
        return f"{part}.{direction}_blocks.{level}.{_MOVQ_BLOCK[kind]}.{rest}"
    m = re.match(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$", key)
    if m:
        return f"{m[1]}.mid_block.{_MOVQ_MID[m[2]]}.{m[3]}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def movq_key(key: str, levels: int) -> str:
    key = _movq_structure(key, levels)
    key = re.sub(r"\.nin_shortcut\.", ".conv_shortcut.", key)
    key = re.sub(r"\.attentions\.(\d+)\.(q|k|v|proj_out)\.", lambda m: f".attentions.{m[1]}.{_ATTN_LINEAR[m[2]]}.",
                 key)
    if key.startswith("encoder."):  # plain GroupNorms in the encoder (SpatialNorm without a zq input)
        key = re.sub(r"\.attentions\.(\d+)\.norm\.norm_layer\.", r".attentions.\1.group_norm.", key)
        key = re.sub(r"\.(norm1|norm2|conv_norm_out)\.norm_layer\.", r".\1.", key)
    else:  # SpatialNorm conditioned on the latents: norm_layer, conv_y, conv_b
        key = re.sub(r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.spatial_norm.", key)
    return key


# ----------------------------------------------------------------------------------------- remapping
def remap(state: Mapping, rename: Callable[[str], str], target: Mapping, *, what: str,
          allowed_missing: tuple[str, ...] = ()) -> dict:
    """`state` renamed onto the keys and shapes of `target` (a diffusers state dict). A 1x1 conv weight lands
    on a Linear weight by dropping its two unit dims. Raises UnmappedKeysError listing every problem."""
    out, unmatched, mismatched = {}, [], []
    for key, tensor in state.items():
        new = rename(key)
        if new not in target:
            unmatched.append(f"{key} (-> {new})" if new != key else key)
            continue
        want = tuple(target[new].shape)
        if tuple(tensor.shape) != want and tensor.dim() == 4 and tensor.shape[2:] == (1, 1) and len(want) == 2:
            tensor = tensor[:, :, 0, 0]
        if tuple(tensor.shape) != want:
            mismatched.append(f"{key}: {tuple(tensor.shape)} vs {new}: {want}")
            continue
        out[new] = tensor
    missing = [k for k in target if k not in out and k not in allowed_missing]
    if unmatched or missing or mismatched:
        raise UnmappedKeysError(what, unmatched=unmatched, missing=missing, mismatched=mismatched)
    return out
