"""Real LoRA adapters made with PEFT for tests and the docs' pictures: one trained a few steps on a preset's
U-Net (seconds on the tiny preset), saved as PEFT saves it."""
from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_inputs(config: dict, gen: torch.Generator) -> dict:
    context = config["encoder_hid_dim"]
    return {"sample": torch.randn(2, config["in_channels"], 8, 8, generator=gen),
            "timestep": torch.tensor([10.0, 500.0]),
            "encoder_hidden_states": torch.randn(2, 6, context, generator=gen),
            "encoder_attention_mask": torch.ones(2, 6)}


def train_peft_lora(model_dir: Path, out: Path, *, rank: int = 4, alpha: int = 8, steps: int = 6, seed: int = 0,
                    targets=TARGETS, **config):
    """A PEFT LoRA on the U-Net's attention projections, trained `steps` Adam steps towards a random target
    (so lora_B is far from its zero init), saved with `save_pretrained`. Returns the PEFT model (for merging)."""
    from diffusers import Kandinsky3UNet
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    unet = Kandinsky3UNet.from_pretrained(str(model_dir / "unet"), torch_dtype=torch.float32)
    model = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), **config))
    gen = torch.Generator().manual_seed(seed)
    inputs = unet_inputs(unet.config, gen)
    target = torch.randn(2, unet.config["in_channels"], 8, 8, generator=gen)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(unet(**inputs, return_dict=False)[0], target)
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(out))
    return model.eval()
