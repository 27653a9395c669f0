"""How much hoisting the conditional-norm MLPs out of the denoising loop could save, at most, on ONNX Runtime.

Every ResNet/attention norm of the U-Net scales and shifts by an MLP of the timestep embedding and the pooled
text (`context_mlp`). Those values depend only on the step, so all steps' values could be computed in one
batched call before the loop. The upper bound of the saving: the same U-Net graph with every `context_mlp`
Gemm output fed as a precomputed input (the MLP subgraphs removed), timed interleaved against the original.
Before the loop the hoisted design would still run those Gemms once, batched over all steps; this ignores
that cost, so the real saving is smaller than the printed one.

    python3 verify/experiments/hoisting_bound.py --artifacts small-art --resolution 256x256 --repeats 15
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from k3trt.verify.experiments._unet_inputs import arguments, example_feeds, unet_graph
from onnx import TensorProto, helper


def session(model: onnx.ModelProto | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def mlp_outputs(path: str, feeds: dict, names: list[str], threads: int) -> tuple[np.ndarray, dict]:
    """The U-Net output and the values of `names`, from the original graph."""
    probe = onnx.load(path)
    probe.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names])
    values = session(probe, threads).run(None, feeds)
    return values[0], dict(zip(names, values[1:]))


def without_producers(model: onnx.ModelProto, precomputed: dict) -> onnx.ModelProto:
    """`model` with each precomputed tensor a graph input and whatever only fed it removed."""
    graph = model.graph
    kept = [n for n in graph.node if not set(n.output) & set(precomputed)]
    graph.input.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
                        for n, v in precomputed.items()])
    while True:  # drop dead nodes until none is left
        used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
        alive = [n for n in kept if set(n.output) & used]
        if len(alive) == len(kept):
            break
        kept = alive
    graph.ClearField("node")
    graph.node.extend(kept)
    used = {i for n in kept for i in n.input}
    initializers = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    return model


def measure(artifacts: str, *, resolution: str = "256x256", repeats: int = 15, threads: int = 2) -> dict:
    path = unet_graph(artifacts)
    model = onnx.load(path)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and "context_mlp" in n.name]
    weights = {n.input[1] for n in gemms}
    result = {"gemms": len(gemms), "nodes_before": len(model.graph.node),
              "weight_mb": sum(np.prod(i.dims) * 4 for i in model.graph.initializer if i.name in weights) / 1e6}
    feeds = example_feeds(artifacts, resolution)
    reference, precomputed = mlp_outputs(path, feeds, [n.output[0] for n in gemms], threads)
    hoisted = without_producers(model, precomputed)
    result["nodes_after"] = len(hoisted.graph.node)
    original, lean = session(path, threads), session(hoisted, threads)
    lean_feeds = {**feeds, **precomputed}
    result["max_abs_difference"] = float(np.abs(lean.run(None, lean_feeds)[0] - reference).max())
    times = {"original": [], "hoisted": []}
    for _ in range(repeats):  # interleaved, so machine drift hits both alike
        for name, sess, f in (("original", original, feeds), ("hoisted", lean, lean_feeds)):
            start = time.perf_counter()
            sess.run(None, f)
            times[name].append(time.perf_counter() - start)
    result.update({f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()})
    return result


def main() -> None:
    args = arguments(__doc__, repeats=15)
    r = measure(args.artifacts, resolution=args.resolution, repeats=args.repeats, threads=args.threads)
    print(f"{r['gemms']} conditional-norm MLP Gemms ({r['weight_mb']:.1f} MB of fp32 weights); "
          f"nodes {r['nodes_before']} -> {r['nodes_after']}")
    print(f"max abs difference of the U-Net output: {r['max_abs_difference']:.3g} (the rewrite is exact)")
    saving = 100 * (1 - r["hoisted_ms"] / r["original_ms"])
    print(f"{args.resolution}, batch 2, {args.threads} threads, median of {args.repeats}: U-Net step "
          f"{r['original_ms']:.1f} ms, MLPs precomputed {r['hoisted_ms']:.1f} ms: at most {saving:.1f}% of a step")


if __name__ == "__main__":
    main()
