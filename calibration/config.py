"""Calibration settings as frozen, serializable specs; the defaults live here and in the CLI signatures."""
from __future__ import annotations

import dataclasses
import enum

from k3trt.contract.cards import PIXEL_MULTIPLE
from k3trt.contract.errors import InvalidArgumentError

CALIBRATION_VERSION = 1  # bump when collection or quantization changes, so caches and int8 keys refresh
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")  # TensorRT fuses Q/DQ into exactly these (Linear = MatMul)

# Kept float by default: (substring of the ONNX node name, why). Node names follow torch module paths.
DEFAULT_EXCLUSIONS: tuple[tuple[str, str], ...] = (
    ("/unet/conv_in/", "first layer: raw latents in, small compute, error reaches every later layer"),
    ("/unet/conv_out/", "last layer: writes the noise prediction itself"),
    ("/unet/time_embedding/", "timestep MLP: an error shifts every conditional norm at once"),
    # (no /unet/ prefix: the inpainting and Flash U-Nets' wrapper runs the projection itself, docs/tasks.md)
    ("/encoder_hid_proj/", "text projection: feeds every cross-attention key and value"),
    ("/unet/add_time_condition/", "attention pooling of the text into the time embedding"),
    ("/context_mlp/", "conditional GroupNorm scale/shift MLPs (norms): batch-size rows, nothing to gain, "
                      "their output rescales whole feature maps"),
)


class Calibrator(str, enum.Enum):
    """Activation range estimators of onnxruntime.quantization."""
    MAX = "max"  # min/max over all calibration data
    PERCENTILE = "percentile"  # clip the |x| histogram at a percentile (NVIDIA's choice for Conv)
    ENTROPY = "entropy"  # KL-optimal threshold (TensorRT's legacy calibrator)

    @classmethod
    def parse(cls, value: "str | Calibrator") -> "Calibrator":
        try:
            return cls(str(getattr(value, "value", value)).lower())
        except ValueError:
            raise InvalidArgumentError(f"unknown calibrator {value!r}", accepted=", ".join(c.value for c in cls),
                                       fix="--calibrator percentile (the default)") from None


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
    """How calibration/held-out trajectories are generated with the fp32 runtime."""
    steps: int = 25
    seed: int = 0  # prompt i uses seed + i
    guidance: float = 3.0
    height: int = 1024
    width: int = 1024

    def __post_init__(self):
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise InvalidArgumentError(f"--steps {self.steps!r}", accepted="an integer in 1..1000",
                                       fix="--steps 25 (the default)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < PIXEL_MULTIPLE or value % PIXEL_MULTIPLE:
                raise InvalidArgumentError(f"--{name} {value!r}", accepted=f"a multiple of {PIXEL_MULTIPLE}, at "
                                           f"least {PIXEL_MULTIPLE}",
                                           fix="omit it to use the model's native size")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Symmetric INT8: per-channel weights, per-tensor activations, Q/DQ on Conv/MatMul/Gemm inputs."""
    calibrator: Calibrator = Calibrator.PERCENTILE
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()  # extra node-name substrings to keep float
    default_exclusions: bool = True
    op_types: tuple[str, ...] = QUANTIZED_OP_TYPES

    def __post_init__(self):
        object.__setattr__(self, "calibrator", Calibrator.parse(self.calibrator))
        if not 90.0 <= float(self.percentile) < 100.0:
            raise InvalidArgumentError(f"--percentile {self.percentile!r}", accepted="90 <= p < 100",
                                       fix="--percentile 99.99 (the default)")
        bad = [p for p in self.exclude if not isinstance(p, str) or not p.strip()]
        if bad:
            raise InvalidArgumentError(f"--exclude {bad!r}", accepted="non-empty ONNX node names or substrings")

    def patterns(self) -> tuple[str, ...]:
        defaults = tuple(p for p, _ in DEFAULT_EXCLUSIONS) if self.default_exclusions else ()
        return defaults + tuple(self.exclude)

    def range_settings(self) -> dict:
        """What the activation ranges depend on (exclusions do not: every candidate tensor is calibrated)."""
        out = {"calibrator": self.calibrator.value, "op_types": list(self.op_types)}
        if self.calibrator is Calibrator.PERCENTILE:
            out["percentile"] = float(self.percentile)
        return out

    def as_dict(self) -> dict:
        return {**self.range_settings(), "exclude": list(self.exclude),
                "default_exclusions": self.default_exclusions}
