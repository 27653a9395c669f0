"""What this CPU can do, from /proc/cpuinfo: the model name and the instruction sets reduced precision needs."""
from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products: AVX-512 BF16 (Cooper Lake, Zen 4+) or AMX


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset

    @property
    def bf16(self) -> bool:
        return any(flag in self.flags for flag in BF16_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    def describe(self) -> str:
        isa = [name for name, ok in (("avx512f", "avx512f" in self.flags), ("avx512_vnni", "avx512_vnni" in self.flags),
                                     ("avx512_bf16", "avx512_bf16" in self.flags), ("amx_bf16", self.amx)) if ok]
        return f"{self.model} ({', '.join(isa) or 'no AVX-512'}{'' if self.amx else '; no AMX'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    model, flags = platform.processor() or "unknown CPU", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", "unknown CPU", platform.processor()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model, flags)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    path = Path("/proc/cpuinfo")
    return parse_cpuinfo(path.read_text() if path.is_file() else "")
