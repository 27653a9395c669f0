"""Precision as an enum: one vocabulary for export variants, engines and the runtime."""
from __future__ import annotations

import enum

from .errors import InvalidArgumentError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InvalidArgumentError(
                f"unknown precision {value!r}",
                accepted=", ".join(p.value for p in cls),
                fix="pass one of the accepted names, e.g. --precision fp16",
            ) from None

    def __str__(self) -> str:  # argparse/f-strings print the plain name
        return self.value
