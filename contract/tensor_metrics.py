"""Parity metrics shared by export validation, the parity command, calibration and the engine self-test.

Tensors: max abs, relative L2 and cosine; images: PSNR. NaN/Inf always fails, whatever the tolerance.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def _as_f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class TensorMetrics:
    max_abs: float
    rel_l2: float
    cosine: float
    finite: bool

    def within(self, *, rel_l2: float | None = None, max_abs: float | None = None,
               cosine: float | None = None) -> bool:
        """True only if finite and inside every bound given."""
        if not self.finite:
            return False
        return ((rel_l2 is None or self.rel_l2 <= rel_l2) and (max_abs is None or self.max_abs <= max_abs)
                and (cosine is None or self.cosine >= cosine))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"max_abs={self.max_abs:.3g} rel_l2={self.rel_l2:.3g} cosine={self.cosine:.6f}"


def compare(reference, candidate) -> TensorMetrics:
    ref, cand = _as_f64(reference), _as_f64(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
    finite = bool(np.isfinite(cand).all() and np.isfinite(ref).all())
    if not finite:
        return TensorMetrics(math.inf, math.inf, -1.0, False)
    diff = cand - ref
    ref_norm, cand_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(cand))
    rel_l2 = float(np.linalg.norm(diff)) / max(ref_norm, 1e-30)
    if ref_norm == 0.0 and cand_norm == 0.0:
        cosine = 1.0
    else:
        cosine = float(np.dot(ref.ravel(), cand.ravel()) / max(ref_norm * cand_norm, 1e-30))
    return TensorMetrics(float(np.abs(diff).max(initial=0.0)), rel_l2, cosine, True)


def psnr(reference, candidate, data_range: float = 1.0) -> float:
    """PSNR in dB of two images in [0, data_range]; inf for identical images, -inf if non-finite."""
    ref, cand = _as_f64(reference), _as_f64(candidate)
    if not (np.isfinite(ref).all() and np.isfinite(cand).all()):
        return -math.inf
    mse = float(np.mean((ref - cand) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)
