"""Seeds: every integer in 0..2^64-1 names its own noise.

torch's CPU generator keeps only the low 32 bits of `manual_seed` (its Mersenne Twister is seeded from a
32-bit value), so 2^32 and 0, or 2^63 and 0, would silently give the same image. Here:

- seeds 0..2^32-1 are exactly `torch.Generator("cpu").manual_seed(seed)`: the generator diffusers users pass,
  so the runtime and `diffusers.Kandinsky3Pipeline` draw identical noise (what `k3trt parity` relies on);
- seeds 2^32..2^64-1 fill the twister's whole 624-word state from `numpy.random.SeedSequence(seed)`, a
  hash of all 64 bits, so no two seeds share a state (and none collides with a 32-bit seed's state in
  practice: 19968 bits of state against 2^64 seeds).

Anything else is refused by `k3trt.contract.arguments.check_seed`.
"""
from __future__ import annotations

import struct

import torch
from k3trt.contract.arguments import check_seed

_MT_WORDS = 624
_HEADER = struct.Struct("<QiiQ")  # the_initial_seed, left, seeded, next (torch's CPUGeneratorImplState)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for `seed` (0..2^64-1) with the semantics above."""
    seed = check_seed(seed)
    generator = torch.Generator("cpu")
    if seed < 2**32:
        return generator.manual_seed(seed)
    import numpy as np

    words = np.random.SeedSequence(seed).generate_state(_MT_WORDS, dtype=np.uint32)
    state = bytearray(generator.get_state().numpy().tobytes())
    _HEADER.pack_into(state, 0, seed, 1, 1, 0)  # left=1: the twister regenerates before its first draw
    struct.pack_into(f"<{_MT_WORDS}Q", state, _HEADER.size, *(int(w) for w in words))
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return generator


def seed_everything(seed: int) -> None:
    """The same seed semantics for torch's global generator (preset weights)."""
    torch.default_generator.set_state(make_generator(seed).get_state())
