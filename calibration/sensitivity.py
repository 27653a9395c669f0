"""Per-layer sensitivity: which quantized layers cost the most output accuracy.

Method: quantize one block, then one layer, at a time (all other layers fp32) and measure the worst-timestep
cosine against fp32 on a probe set (the held-out calls at the `probe_timesteps` worst timesteps of the full
int8 model). `cost = 1 - cosine` is that layer's own error: unlike leave-one-out, it carries no cross-terms
with the other layers' errors, which on these networks are as large as a single layer's effect. Since the
errors add up roughly independently, keeping a layer float gains about its cost. Blocks are module paths
(`/unet/down_blocks.1/attentions.2/`); the layers of the `top_groups` costliest blocks are then ranked.
Toggling is graph surgery on the quantized model (no re-calibration): one session and a few calls per
variant, minutes on the small preset.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
from k3trt.calibration.quality import TimestepOutputs, fake_quant_session, run_calls
from k3trt.contract.tensor_metrics import compare


@dataclasses.dataclass(frozen=True)
class SensitivityConfig:
    top_groups: int = 3  # blocks refined layer by layer
    probe_timesteps: int = 3  # worst timesteps of the full int8 model
    probe_prompts: int = 2  # held-out prompts per probe timestep
    suggest: int = 6  # layers suggested for --exclude


def group_of(node_name: str) -> str:
    """`/unet/down_blocks.1/attentions.2/attention/to_q/MatMul` -> `/unet/down_blocks.1/attentions.2/`."""
    parts = node_name.strip("/").split("/")[:-1]  # drop the op name (`Conv`, `MatMul`)
    depth = 3 if len(parts) > 1 and "_blocks." in parts[1] else 2
    return "/" + "/".join(parts[:depth]) + "/"


class QdqToggle:
    """Serializes variants of a Q/DQ model in which chosen nodes read fp32 inputs and weights again."""

    def __init__(self, qmodel, fp32_model):
        self.model = qmodel
        self._producers = {out: n for n in qmodel.graph.node for out in n.output}
        self._nodes = {n.name: n for n in qmodel.graph.node}
        inits = {i.name for i in qmodel.graph.initializer}
        fp32_inits = {i.name: i for i in fp32_model.graph.initializer}
        self._float: dict[str, list[tuple[int, str]]] = {}
        for node in qmodel.graph.node:
            pairs = self._float_inputs(node, inits)
            if pairs:
                self._float[node.name] = pairs
        for weight in {name for pairs in self._float.values() for _, name in pairs} & set(fp32_inits) - inits:
            qmodel.graph.initializer.append(fp32_inits[weight])  # unused until a node is toggled to float

    def _float_inputs(self, node, inits) -> list[tuple[int, str]]:
        """(input index, fp32 tensor name) for each input the node reads through a DequantizeLinear."""
        out = []
        for index, name in enumerate(node.input[:2]):
            dq = self._producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            if source in inits:  # a weight: onnxruntime names it <fp32 name>_quantized
                out.append((index, source.removesuffix("_quantized")))
            else:
                q = self._producers.get(source)
                out.append((index, q.input[0] if q is not None else source))
        return out

    def variant(self, float_nodes) -> bytes:
        """The model with `float_nodes` unquantized; the in-memory model is restored afterwards."""
        saved = []
        try:
            for node in (self._nodes[n] for n in float_nodes):
                for index, name in self._float[node.name]:
                    saved.append((node, index, node.input[index]))
                    node.input[index] = name
            return self.model.SerializeToString()
        finally:
            for node, index, name in reversed(saved):
                node.input[index] = name


def probe_calls(heldout, rows: list[dict], config: SensitivityConfig) -> list:
    worst = {r["timestep"] for r in sorted(rows, key=lambda r: r["cosine"])[:config.probe_timesteps]}
    prompts = range(min(config.probe_prompts, len(heldout.files)))
    return [c for c in heldout.unet_calls(prompts) if c.timestep in worst]


def worst_cosine(outputs: TimestepOutputs) -> float:
    return min(compare(np.stack(outputs.reference[t]), np.stack(outputs.candidate[t])).cosine
               for t in outputs.timesteps)


def measure(toggle: QdqToggle, groups: dict[str, list[str]], quantized: list[str], calls, threads,
            label) -> list[dict]:
    """For each group: quantize only it; cost = 1 - worst-timestep cosine on the probe calls."""
    from tqdm import tqdm

    rows = []
    for name, nodes in tqdm(groups.items(), desc=label, unit="variant", file=sys.stderr):
        only = set(nodes)
        session = fake_quant_session(toggle.variant([n for n in quantized if n not in only]), threads)
        cosine = worst_cosine(run_calls(session, calls, progress=False))
        rows.append({"name": name, "nodes": len(nodes), "worst_cosine": cosine, "cost": 1.0 - cosine})
    return sorted(rows, key=lambda r: r["cost"], reverse=True)


def analyze(qmodel_path, fp32_model_path, quantized_nodes: list[str], heldout, rows: list[dict],
            config: SensitivityConfig = SensitivityConfig(), *, threads: int | None = None, log=print) -> dict:
    """Block-level, then layer-level costs (one quantized at a time) on the probe set."""
    import onnx

    calls = probe_calls(heldout, rows, config)
    base = worst_cosine(run_calls(fake_quant_session(qmodel_path, threads), calls, progress=False))
    toggle = QdqToggle(onnx.load(str(qmodel_path)), onnx.load(str(fp32_model_path)))
    groups: dict[str, list[str]] = {}
    for node in quantized_nodes:
        groups.setdefault(group_of(node), []).append(node)
    log(f"sensitivity: {len(groups)} blocks one at a time, then the layers of the top {config.top_groups}, on "
        f"{len(calls)} probe calls (full int8 worst-timestep cosine {base:.5f})")
    block_rows = measure(toggle, groups, quantized_nodes, calls, threads, "sensitivity (blocks)")
    layers = {n: [n] for row in block_rows[:config.top_groups] for n in groups[row["name"]]}
    layer_rows = measure(toggle, layers, quantized_nodes, calls, threads, "sensitivity (layers)")
    return {"method": "one block / layer quantized at a time; cost = 1 - worst-timestep cosine vs fp32",
            "config": dataclasses.asdict(config), "probe_timesteps": sorted({c.timestep for c in calls}, reverse=True),
            "probe_calls": len(calls), "base_worst_cosine": base,
            "total_block_cost": sum(r["cost"] for r in block_rows), "blocks": block_rows, "layers": layer_rows,
            "suggested_exclusions": [r["name"] for r in layer_rows[:config.suggest]]}
