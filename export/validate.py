"""Validation right after export: ONNX Runtime (CPU) against the torch module at shapes unlike the trace's."""
from __future__ import annotations

import numpy as np
import torch

from ..runtime.backends.ort import cpu_session
from ..runtime.metrics import compare
from .components import ComponentSpec


def validate_component(spec: ComponentSpec, module: torch.nn.Module, onnx_path, info: dict, *,
                       seed: int = 1234) -> tuple[dict, list[str]]:
    """Run torch and ONNX Runtime on fresh random inputs at each `spec.validate` shape.

    Returns (results for the manifest, failures). A failure names the component, shape and output."""
    session = cpu_session(onnx_path, flush_denormals=False)  # exact fp32 semantics for validation
    wrapper = spec.wrapper(module).eval()
    gen = torch.Generator().manual_seed(seed)
    results, failures = [], []
    for dims in spec.validate:
        inputs = spec.make_inputs(dims, info, gen)
        with torch.no_grad():
            expected = wrapper(*(inputs[name] for name in spec.input_names))
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
        for name, ref, out in zip(spec.output_names, expected, got):
            metrics = compare(ref.numpy(), np.asarray(out))
            ok = metrics.within(rel_l2=spec.rel_l2_fp32)
            results.append({"dims": dims, "output": name, "ok": ok, **metrics.as_dict()})
            if not ok:
                failures.append(f"{spec.name}.{name} at {dims}: {metrics} (bound rel_l2 <= {spec.rel_l2_fp32:g},"
                                f" finite)")
    return {"bound_rel_l2": spec.rel_l2_fp32, "cases": results}, failures
