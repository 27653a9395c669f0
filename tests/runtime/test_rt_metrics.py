"""Parity metrics: values on known inputs, and NaN/Inf always failing."""
import math

import numpy as np
import pytest

from k3trt.contract.tensor_metrics import compare, psnr


def test_known_values():
    ref = np.array([3.0, 4.0])
    m = compare(ref, np.array([3.0, 4.5]))
    assert m.max_abs == pytest.approx(0.5)
    assert m.rel_l2 == pytest.approx(0.5 / 5.0)
    assert m.cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert m.within(rel_l2=0.2) and not m.within(rel_l2=0.05) and not m.within(cosine=0.9999)


def test_identical_and_zero_tensors():
    assert compare(np.ones(4), np.ones(4)).rel_l2 == 0.0
    assert compare(np.zeros(4), np.zeros(4)).cosine == 1.0
    assert psnr(np.full((2, 2), 0.5), np.full((2, 2), 0.5)) == math.inf
    assert psnr(np.zeros((2, 2)), np.full((2, 2), 0.1)) == pytest.approx(20.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_always_fails(bad):
    cand = np.array([1.0, bad])
    m = compare(np.array([1.0, 2.0]), cand)
    assert not m.finite and not m.within(rel_l2=1e9)
    assert psnr(np.array([0.1, 0.2]), cand) == -math.inf


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        compare(np.zeros(3), np.zeros(4))
