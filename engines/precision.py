"""Per-component precision selection for engine builds, and the ONNX nodes that must stay fp32.

The defaults and the fp32-island policy per precision are on each component's card (k3trt.runtime.cards,
`PrecisionPolicy`, with the reasons); this module resolves what a build asks for against them.

The node finders are pure functions of an onnx.ModelProto; the builder maps node names to TensorRT layers.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from k3trt.runtime.cards import CARDS, COMPONENTS
from k3trt.runtime.errors import ArtifactError, InvalidArgumentError
from k3trt.runtime.precision import Precision

DEFAULT_PRECISION = {name: Precision.parse(c.precision.default) for name, c in CARDS.items()}
QUANTIZED = (Precision.INT8, Precision.FP8)  # need an explicit Q/DQ ONNX variant in the manifest

# Builder flags per precision (Polygraphy CreateConfig keyword arguments set to True).
BUILDER_FLAGS = {
    Precision.FP32: (),
    Precision.TF32: ("tf32",),
    Precision.FP16: ("fp16",),
    Precision.BF16: ("bf16",),
    Precision.INT8: ("int8", "fp16"),  # Q/DQ layers run int8, the rest may fall back to fp16
    Precision.FP8: ("fp8", "fp16"),
}
# A strongly typed network follows the ONNX types and forbids precision flags and per-layer constraints, so
# it suits only plans that need neither: plain fp32 (the exported graphs are fp32 throughout).
STRONGLY_TYPED = (Precision.FP32,)


@dataclasses.dataclass(frozen=True)
class ComponentPrecision:
    component: str
    precision: Precision
    variant: str  # the ONNX variant the engine is built from (fp32, or int8/fp8 Q/DQ)
    builder_flags: tuple[str, ...]
    strongly_typed: bool
    fp32_policy: str  # "none" or a key of FP32_FINDERS

    def to_dict(self) -> dict:
        return {"precision": self.precision.value, "variant": self.variant, "builder_flags": list(self.builder_flags),
                "strongly_typed": self.strongly_typed, "fp32_policy": self.fp32_policy}


# ----------------------------------------------------------------------------------------- selection
def parse_component_precision(text: str | None) -> dict[str, Precision]:
    """'text_encoder=bf16,unet=fp16' -> {component: Precision}."""
    out: dict[str, Precision] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise InvalidArgumentError(f"--component-precision item {item!r} is not COMPONENT=PRECISION",
                                       accepted="e.g. text_encoder=bf16,unet=fp16,movq_decoder=fp16",
                                       fix="separate items with commas and name each component once")
        if name not in COMPONENTS:
            raise InvalidArgumentError(f"unknown component {name!r} in --component-precision",
                                       accepted=", ".join(COMPONENTS), fix="e.g. unet=fp16")
        if name in out:
            raise InvalidArgumentError(f"component {name!r} appears twice in --component-precision",
                                       fix="name each component once")
        out[name] = Precision.parse(value)
    return out


def _policy(component: str, precision: Precision) -> str:
    return CARDS[component].precision.islands(precision.value)


def _resolve(component: str, precision: Precision | None, explicit: Precision | None,
             variants: Iterable[str]) -> Precision:
    if explicit is not None:
        if explicit in QUANTIZED and explicit.value not in variants:
            fix = ("run `k3trt calibrate --artifacts ART` first" if explicit is Precision.INT8 else
                   "export an fp8 Q/DQ variant first")
            raise ArtifactError(f"{component}={explicit} needs an explicit {explicit} Q/DQ ONNX variant",
                                accepted=", ".join(sorted(variants)), fix=fix)
        return explicit
    if precision is None:
        return DEFAULT_PRECISION[component]
    if precision in QUANTIZED and precision.value not in variants:
        return DEFAULT_PRECISION[component]  # a global --precision int8 quantizes what has a Q/DQ variant
    return precision


def select_precisions(components: Iterable[str], precision: str | Precision | None = None,
                      overrides: Mapping[str, Precision] | None = None,
                      variants: Mapping[str, Iterable[str]] | None = None) -> dict[str, ComponentPrecision]:
    """Effective precision per component: per-component override > global --precision > default.

    `variants` maps component -> ONNX variants in the manifest (fp32, int8, ...)."""
    glob = None if precision is None else Precision.parse(precision)
    overrides, variants = dict(overrides or {}), dict(variants or {})
    out = {}
    for name in components:
        have = set(variants.get(name, ("fp32",)))
        chosen = _resolve(name, glob, overrides.get(name), have)
        if glob in QUANTIZED and name == "unet" and glob.value not in have and name not in overrides:
            fix = "run `k3trt calibrate --artifacts ART`" if glob is Precision.INT8 else "export an fp8 variant"
            raise ArtifactError(f"--precision {glob} asks for a {glob} U-Net, but the manifest has no {glob} "
                                f"U-Net variant", accepted=", ".join(sorted(have)), fix=fix)
        out[name] = ComponentPrecision(
            name, chosen, chosen.value if chosen in QUANTIZED else "fp32", BUILDER_FLAGS[chosen],
            chosen in STRONGLY_TYPED, _policy(name, chosen))
    return out


# ----------------------------------------------------------------------------------------- graph queries
class _Graph:
    """Producer/consumer maps and constant lookup over one ONNX graph (top level only)."""

    def __init__(self, model):
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name for t in graph.initializer}
        self._init_protos = {t.name: t for t in graph.initializer}
        self._numpy = numpy_helper

    def is_constant(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.initializers or (node is not None and node.op_type == "Constant")

    def scalar(self, name: str) -> float | None:
        """Value of a 1-element constant (initializer or Constant node), else None."""
        if name in self._init_protos:
            proto = self._init_protos[name]
            if proto.data_location == proto.EXTERNAL:  # graphs are loaded without weights; scalars are inline
                return None
            array = self._numpy.to_array(proto)
        else:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant":
                return None
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is None:
                return None
            array = self._numpy.to_array(attr.t)
        return float(array.reshape(-1)[0]) if array.size == 1 else None

    def only_consumer(self, tensor: str, ops: Iterable[str]):
        found = [n for n in self.consumers.get(tensor, []) if n.op_type in set(ops)]
        return found[0] if len(found) == 1 else None


def t5_rms_norm_nodes(model) -> list[str]:
    """T5LayerNorm as exported: [Cast] -> Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(1, .) | Reciprocal
    -> Mul(x, .) -> [Mul(weight, .)]. Found by structure, so renamed nodes still match."""
    g, names = _Graph(model), []
    for pow_node in (n for n in g.nodes if n.op_type == "Pow"):
        if len(pow_node.input) < 2 or g.scalar(pow_node.input[1]) != 2.0:
            continue
        chain, tensor = [pow_node], pow_node.output[0]
        for ops in (("ReduceMean",), ("Add",), ("Sqrt",), ("Div", "Reciprocal"), ("Mul",)):
            nxt = g.only_consumer(tensor, ops)
            if nxt is None:
                break
            chain.append(nxt)
            tensor = nxt.output[0]
        else:
            scale = g.only_consumer(tensor, ("Mul",))
            if scale is not None and any(g.is_constant(i) for i in scale.input):
                chain.append(scale)
            source = g.producer.get(pow_node.input[0])
            if source is not None and source.op_type == "Cast":
                chain.insert(0, source)
            names.extend(n.name for n in chain)
    return names


def t5_ffn_output_matmuls(model) -> list[str]:
    """The FFN output projections (`.../DenseReluDense/wo/MatMul`), found by their exported scope names."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and "/DenseReluDense/wo/" in n.name]


def t5_residual_adds(model, norm_nodes: Iterable[str]) -> list[str]:
    """Adds producing the residual stream: the input of each RMSNorm (through its Cast) and the Add that takes
    each `wo` output. Keeping `wo` fp32 while adding it into an fp16 stream would just move the overflow."""
    g = _Graph(model)
    wanted = set(norm_nodes)
    adds = []
    for node in (n for n in g.nodes if n.name in wanted and n.op_type in ("Cast", "Pow")):
        source = g.producer.get(node.input[0])
        if source is not None and source.op_type == "Add":
            adds.append(source.name)
    for name in t5_ffn_output_matmuls(model):
        matmul = next(n for n in g.nodes if n.name == name)
        consumer = g.only_consumer(matmul.output[0], ("Add",))
        if consumer is not None:
            adds.append(consumer.name)
    return list(dict.fromkeys(adds))


NORM_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization")


def norm_and_softmax_nodes(model) -> list[str]:
    """Normalization nodes with the Reshapes around them, their affine Mul/Add (constant operands), the
    SpatialNorm modulation that follows (Mul/Add with computed operands), and every Softmax."""
    g, names = _Graph(model), []
    for node in g.nodes:
        if node.op_type == "Softmax":
            names.append(node.name)
        if node.op_type not in NORM_OPS:
            continue
        source = g.producer.get(node.input[0])
        if source is not None and source.op_type == "Reshape":
            names.append(source.name)
        names.append(node.name)
        tensor = node.output[0]
        for ops, want_constant in ((("Reshape",), None), (("Mul",), True), (("Add",), True),
                                   (("Mul",), False), (("Add",), False)):
            nxt = g.only_consumer(tensor, ops)
            if nxt is None or (want_constant is not None and
                               any(g.is_constant(i) for i in nxt.input) != want_constant):
                break
            names.append(nxt.name)
            tensor = nxt.output[0]
    return list(dict.fromkeys(names))


def fp32_nodes(policy: str, model) -> tuple[str, ...]:
    """ONNX node names the engine must run in fp32 under `policy`."""
    if policy == "none":
        return ()
    if policy == "movq_norms_softmax":
        return tuple(norm_and_softmax_nodes(model))
    norms = t5_rms_norm_nodes(model)
    if not norms:
        raise ArtifactError("no T5 RMSNorm (Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul) found in the text "
                            "encoder graph", fix="check the export; refusing to build a reduced-precision T5 "
                            "without fp32 norms (use --component-precision text_encoder=fp32)")
    if policy == "t5_norms":
        return tuple(norms)
    if policy == "t5_norms_wo_residual":
        wo = t5_ffn_output_matmuls(model)
        if not wo:
            raise ArtifactError("no T5 FFN output MatMul (`/DenseReluDense/wo/MatMul`) found by name",
                                fix="use --component-precision text_encoder=bf16 (the default); plain fp16 "
                                    "T5 overflows")
        return tuple(dict.fromkeys(norms + wo + t5_residual_adds(model, norms)))
    raise InvalidArgumentError(f"unknown fp32 policy {policy!r}",
                               accepted="none, t5_norms, t5_norms_wo_residual, movq_norms_softmax")
