"""FLOPs counted from ONNX graphs: hand-counted ops, attention MatMuls included, every U-Net node resolved."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from k3trt.runtime.cpuinfo import parse_cpuinfo
from k3trt.verify.flops import count_file, count_model


def _graph_with_every_counted_op():
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    wt = numpy_helper.from_array(np.zeros((8, 4, 2, 2), np.float32), "wt")  # ConvTranspose: (Cin, Cout, k, k)
    g = numpy_helper.from_array(np.zeros((16, 5), np.float32), "g")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),  # (B, 8, 6, 6)
        helper.make_node("ConvTranspose", ["c", "wt"], ["u"], strides=[2, 2]),  # (B, 4, 12, 12)
        helper.make_node("Reshape", ["c", "shape"], ["q"]),  # (B, 36, 8) tokens
        helper.make_node("Transpose", ["q"], ["k"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k"], ["s"]),  # activation x activation: (B, 36, 36), K = 8
        helper.make_node("Gemm", ["v", "g"], ["y"]),  # (B, 16) x (16, 5)
    ]
    shape = numpy_helper.from_array(np.array([0, 36, 8], np.int64), "shape")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 6, 6]),
                                           helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("u", "s", "y")],
                              [w, wt, g, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_counted_flops_at_the_requested_batch():
    b = 3
    count = count_model(_graph_with_every_counted_op(), {"x": (b, 3, 6, 6), "v": (b, 16)})
    expected = {"Conv": 2 * b * 8 * 36 * 27, "ConvTranspose": 2 * b * 8 * 36 * 4 * 4,
                "MatMul": 2 * b * 36 * 36 * 8, "Gemm": 2 * b * 5 * 16}
    assert count.by_op == expected
    assert count.flops == sum(expected.values()) and count.uncounted_nodes == ()


def test_unet_export_has_no_rank_unknown_if_and_every_node_counts(tiny_artifacts):
    from k3trt.contract.manifest import Manifest

    manifest = Manifest.load(tiny_artifacts)
    path = manifest.path(manifest.onnx("unet").graph.path)
    assert not [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "If"]
    small = count_file(path, {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 5, 64),
                              "encoder_attention_mask": (2, 5)})
    large = count_file(path, {"sample": (2, 4, 16, 16), "timestep": (2,), "encoder_hidden_states": (2, 5, 64),
                              "encoder_attention_mask": (2, 5)})
    assert small.uncounted_nodes == () and set(small.by_op) >= {"Conv", "MatMul", "Gemm"}
    assert 3.0 < large.flops / small.flops < 4.2  # convs scale with the pixels, attention faster, MLPs not at all


def test_cpuinfo_detects_bf16_and_amx():
    amd = parse_cpuinfo("model name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_vnni avx512_bf16\n")
    assert amd.bf16 and not amd.amx and "no AMX" in amd.describe()
    old = parse_cpuinfo("model name\t: Old\nflags\t\t: fpu avx2\n")
    assert not old.bf16
    assert parse_cpuinfo("model name : Intel\nflags : avx512f amx_bf16 amx_tile\n").amx
