"""The fp32 islands of each reduced-precision variant: which ONNX nodes stay fp32, found in the fp32 graph.

Each component's card names a policy per precision (`PrecisionPolicy.fp32_islands`); this module implements
the policies as pure functions of an onnx.ModelProto, so the converter (export/variants.py) can keep those nodes
fp32 and every variant records its list. Why each island exists is written on the card:
- t5_norms_wo_residual (T5 in fp16): every RMSNorm, every FFN output projection `wo` and the residual Adds.
- t5_norms (T5 in bf16): every RMSNorm.
- movq_norms_softmax (MoVQ decoder): GroupNorm/InstanceNorm with their affine and SpatialNorm modulation, and
  every Softmax.
- unet_time_projection (U-Net): the sinusoidal timestep projection, timestep x frequency -> Sin/Cos, and every
  float node feeding it (the frequency constants included).
Finders match structure where they can (renamed nodes still match) and exported scope names where they must.
"""
from __future__ import annotations

from typing import Iterable

from k3trt.contract.errors import ArtifactError, InvalidArgumentError

POLICIES = ("none", "t5_norms", "t5_norms_wo_residual", "movq_norms_softmax", "unet_time_projection")


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


def sinusoid_argument_nodes(model) -> list[str]:
    """Every Sin/Cos and the float nodes that compute its argument, back to the graph inputs.

    diffusers' Timesteps layer computes sin/cos(t x f) for t up to 999; fp16 stores 999 x f with a spacing of
    up to 0.5 (its 11-bit mantissa), so the argument is off by up to a quarter turn and the embedding by ~1e-1
    (measured on the small preset: rel L2 9.7e-2 at Sin, 1.7e-2 at the U-Net output, with storage kept).
    The frequency constants must stay fp32 too: rounding f to fp16 costs 999 x f x 2^-11 radians."""
    from onnx import TensorProto, shape_inference

    graph = shape_inference.infer_shapes(model).graph
    floats = {v.name for v in list(graph.value_info) + list(graph.input) + list(graph.output)
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    producer = {out: n for n in graph.node for out in n.output}
    names, stack = [], [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    seen = set()
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        names.append(node.name)
        stack.extend(producer[i] for i in node.input if i in floats and i in producer)
    order = {n.name: i for i, n in enumerate(graph.node)}
    return sorted(names, key=order.__getitem__)


def fp32_nodes(policy: str, model) -> tuple[str, ...]:
    """ONNX node names the engine must run in fp32 under `policy`."""
    if policy == "none":
        return ()
    if policy == "movq_norms_softmax":
        return tuple(norm_and_softmax_nodes(model))
    if policy == "unet_time_projection":
        return tuple(sinusoid_argument_nodes(model))
    norms = t5_rms_norm_nodes(model)
    if not norms:
        raise ArtifactError("no T5 RMSNorm (Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul) found in the text "
                            "encoder graph", fix="check the export; refusing to make a reduced-precision T5 "
                            "without fp32 norms (use --component-precision text_encoder=fp32)")
    if policy == "t5_norms":
        return tuple(norms)
    if policy == "t5_norms_wo_residual":
        wo = t5_ffn_output_matmuls(model)
        if not wo:
            raise ArtifactError("no T5 FFN output MatMul (`/DenseReluDense/wo/MatMul`) found by name",
                                fix="use the bf16 text encoder (the default); plain fp16 T5 overflows")
        return tuple(dict.fromkeys(norms + wo + t5_residual_adds(model, norms)))
    raise InvalidArgumentError(f"unknown fp32 policy {policy!r}", accepted=", ".join(POLICIES),
                               fix="name one of the accepted policies on the component's card")
