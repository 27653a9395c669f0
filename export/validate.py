"""Validation right after export: ONNX Runtime (CPU) against the torch module at shapes unlike the trace's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from k3trt.contract.tensor_metrics import compare
from k3trt.export.components import ComponentSpec
from k3trt.runtime.backends.ort import cpu_session


def _record(spec: ComponentSpec, dims: dict, name: str, ref: np.ndarray, out, results: list, failures: list) -> None:
    metrics = compare(np.asarray(ref), np.asarray(out))
    ok = metrics.within(rel_l2=spec.rel_l2_fp32)
    results.append({"dims": dims, "output": name, "ok": ok, **metrics.as_dict()})
    if not ok:
        failures.append(f"{spec.name}.{name} at {dims}: {metrics} (bound rel_l2 <= {spec.rel_l2_fp32:g}, finite)")


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
            _record(spec, dims, name, ref.numpy(), out, results, failures)
    return {"bound_rel_l2": spec.rel_l2_fp32, "cases": results}, failures


def validate_streamed(spec: ComponentSpec, model_dir: Path, onnx_path, info: dict, *, variant: str | None,
                      seed: int = 1234) -> tuple[dict, list[str]]:
    """`validate_component` for a bounded-memory export (export/streamed.py), same inputs, bound and schema.

    The reference is the fp32 computation with one layer's weights read from the safetensors at a time
    (`streamed_reference_output`); ONNX Runtime runs without graph optimizations or pre-packing, so the weights
    stay in the memory-mapped external data. The two sides run one after the other, never holding both.
    The card's validation shapes are used unchanged: at full size they are still small (latents up to
    3 x 24 x 40, up to 128 tokens); the cost is reading every weight once per case (~3-4 min per side for the
    full U-Net at a small latent on a shared 2-core CPU), not the arithmetic."""
    from k3trt.export.low_memory_trace import bounded_session, streamed_reference_output

    gen = torch.Generator().manual_seed(seed)
    cases = [(dims, spec.make_inputs(dims, info, gen)) for dims in spec.validate]
    session = bounded_session(onnx_path, flush_denormals=False)  # exact fp32 semantics for validation
    got = [session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()}) for _, inputs in cases]
    del session
    results, failures = [], []
    for (dims, inputs), outputs in zip(cases, got):
        (name,) = spec.output_names  # the streamed components (U-Net, text encoder) have one output
        reference = streamed_reference_output(model_dir, inputs, component=spec.name, variant=variant)
        _record(spec, dims, name, reference, outputs[0], results, failures)
    return {"bound_rel_l2": spec.rel_l2_fp32, "reference": "torch fp32, weights streamed layer by layer",
            "cases": results}, failures
