"""Regression tests for what the long fuzzing runs found (issue 11; the HTTP-body target later): each was an
exception outside the project's error types before the fix."""
from __future__ import annotations

import json

import pytest

from k3trt.cli.main import main
from k3trt.contract.errors import ArtifactError, InvalidArgumentError
from k3trt.contract.arguments import check_path


@pytest.mark.parametrize("path", ["\ud800", "out/\ud800.json", "a" * 256, "x/" * 2100])
def test_paths_that_cannot_be_file_names_are_typed_errors(path):
    with pytest.raises(InvalidArgumentError):
        check_path("--out", path)


def test_cli_with_such_paths_exits_2(tiny_artifacts, tiny_model_dir, capsys):
    # found: `parity --report '\ud800'` raised UnicodeEncodeError; `bench --artifacts <300 chars>` ENAMETOOLONG
    for argv in (["parity", "--model", str(tiny_model_dir), "--artifacts", str(tiny_artifacts), "--prompt", "a",
                  "--report", "\ud800"],
                 ["bench", "--artifacts", "a" * 300 + ".png", "--model", str(tiny_model_dir), "--prompt", "a"]):
        assert main(argv) == 2
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("change, needle", [
    ({"pad_id": None}, "tokenizer.pad_id"),  # found: TypeError inside `tokenizers`
    ({"pad_id": 10**6}, "not in its vocabulary"),
    ({"max_length": 10**9}, "tokenizer.max_length"),  # would pad every prompt to a billion tokens
])
def test_tokenizer_entries_are_checked(artifacts_copy, change, needle):
    from k3trt.runtime.pipeline import Pipeline

    path = artifacts_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["tokenizer"].update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=needle.replace(".", r"\.")):
        Pipeline.from_artifacts(artifacts_copy)


def test_lint_of_an_onnx_whose_strings_are_not_utf8(tmp_path):
    # found: a bit flip in a node name made `k3trt check` crash with TypeError (protobuf returned bytes)
    from onnx import TensorProto, helper

    from k3trt.engines.check import check_onnx_file

    node = helper.make_node("Relu", ["x"], ["y"], name="NODENAME")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]).SerializeToString()
    path = tmp_path / "damaged.onnx"
    path.write_bytes(data.replace(b"NODENAME", b"NODE\xe5\xffME"))
    result = check_onnx_file(path)
    assert result.errors and "fields are damaged" in result.errors[0].message, result


def test_multiples_in_the_manifest_are_checked(artifacts_copy):
    # found by the second long run: `extra.multiples: null` gave AttributeError in the shape check
    path = artifacts_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["onnx"]["unet"]["fp32"]["extra"]["multiples"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"extra\.multiples"):
        from k3trt.contract.manifest import Manifest

        Manifest.load(artifacts_copy)


def test_usage_errors_naming_text_that_is_not_utf8_still_print(capsys):
    # found by the second long run: argparse's message with a lone surrogate raised UnicodeEncodeError
    with pytest.raises(SystemExit) as info:
        main(["check", "--artifacts", "a", "\ud800"])  # "unrecognized arguments: ..."
    assert info.value.code == 2
    assert "\\ud800" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["check", "--artifacts", ""], "is not a usable path"),  # found by the third long run: TypeError (the
    (["check", "--onnx", ""], "is not a usable path"),       # empty --artifacts fell through to --onnx None)
    (["check", "--onnx", "."], "is a folder"),
])
def test_check_with_an_empty_or_folder_path_exits_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "internal error" not in err, err


@pytest.mark.parametrize("bad", ["a\x00b", "tok\ud800.json"])
def test_manifest_paths_that_cannot_be_file_names(artifacts_copy, bad, capsys):
    # found by the fourth long run: tokenizer.path "a\x00b" raised ValueError (embedded null byte) in `k3trt check`
    from k3trt.engines.check import check_artifacts

    path = artifacts_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["tokenizer"]["path"] = bad
    path.write_text(json.dumps(data))
    from k3trt.runtime.pipeline import Pipeline

    findings = [f for r in check_artifacts(artifacts_copy) for f in r.errors]
    assert any("not a usable file name" in f.message for f in findings), findings  # an integrity error ...
    assert main(["check", "--artifacts", str(artifacts_copy)]) == 1  # ... so `check` fails: the lint verdict
    assert "internal error" not in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="not a usable file name"):
        Pipeline.from_artifacts(artifacts_copy)


def test_a_subnormal_strength_is_refused_with_a_usable_fix():
    # found by the HTTP-body target: {"strength": 2.2e-313} made the suggested --steps ceil(1 / strength) = ceil(inf),
    # an OverflowError, on /v1/images/edits and in Pipeline.img2img alike
    from k3trt.runtime.images import check_strength

    subnormal = 2.2250738585e-313
    # After an ONNX Runtime or OpenVINO call this thread flushes denormals (both backends ask for it), and the
    # subnormal compares as 0: refused as outside (0, 1]. Either way, a typed error with a usable fix.
    expected = r"= 0 steps.*raise --strength \(e.g. --strength 0.3\)$" if subnormal * 1.0 > 0 else r"a number in \(0, 1\]"
    with pytest.raises(InvalidArgumentError, match=expected):
        check_strength(subnormal, 25)
    with pytest.raises(InvalidArgumentError, match=r"raise --strength .* or --steps 1000$"):
        check_strength(0.001, 25)


def test_a_broken_png_chunk_is_a_typed_error(tmp_path):
    # found by the HTTP-body target: Pillow raises SyntaxError for a broken PNG chunk, past the error types caught
    import base64
    import io

    import numpy as np
    from PIL import Image

    from k3trt.runtime.images import load_image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    at = data.index(b"IDAT")  # IDAT claims 10 bytes, so the next chunk header lies inside the pixel data
    broken = data[:at - 4] + (10).to_bytes(4, "big") + data[at:]
    (tmp_path / "broken.png").write_bytes(broken)
    with pytest.raises(InvalidArgumentError, match=r"is not an image \(SyntaxError\)"):  # --image on the CLI
        load_image(tmp_path / "broken.png")
    pytest.importorskip("fastapi", reason="the HTTP server needs the [serve] extra")
    from k3trt.runtime.serving.schema import FieldError, Limits, to_edit

    body = {"prompt": "a fox", "image": base64.b64encode(broken).decode()}
    with pytest.raises(FieldError, match="image could not be decoded \\(SyntaxError\\)") as error:
        to_edit(body, Limits(min_side=64, max_side=256))
    assert error.value.param == "image"
