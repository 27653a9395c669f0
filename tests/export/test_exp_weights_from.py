"""`k3trt export --weights-from DIR --graphs-from ART`: a same-configuration checkpoint without re-tracing."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory):
    """The tiny preset with another weight seed: same configuration, every weight different."""
    from k3trt.export.presets import write_preset

    return write_preset("tiny", tmp_path_factory.mktemp("tuned") / "tiny-seed1", seed=1)


def _nodes(path):
    model = onnx.load(str(path), load_external_data=False)
    return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]


def test_weights_from_reuses_the_graphs_and_validates_the_new_weights(tiny_artifacts, second_checkpoint, tmp_path):
    from k3trt.contract.manifest import Manifest
    from k3trt.cli.main import main

    out = tmp_path / "tuned-art"
    assert main(["export", "--weights-from", str(second_checkpoint), "--graphs-from", str(tiny_artifacts),
                 "--out", str(out)]) == 0
    old, new = Manifest.load(tiny_artifacts), Manifest.load(out)
    for component in ("text_encoder", "unet", "movq_decoder"):
        before, after = old.onnx(component), new.onnx(component)
        new.verify_onnx(after)
        assert _nodes(old.path(before.graph.path)) == _nodes(new.path(after.graph.path))  # the same traced graph
        assert after.graph.sha256 != before.graph.sha256 and after.source_hash != before.source_hash
        assert after.extra["graph_from"]["graph_sha256"] == before.graph.sha256
        worst = max(case["rel_l2"] for case in after.validation["cases"])
        assert worst <= after.validation["bound_rel_l2"]  # validated against the seed-1 torch modules


def test_weights_from_refuses_another_configuration_before_writing(tiny_artifacts, second_checkpoint, tmp_path,
                                                                    capsys):
    from k3trt.cli.error_boundary import EXIT_PROJECT_ERROR
    from k3trt.cli.main import main

    other = tmp_path / "other"
    shutil.copytree(second_checkpoint, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "groups": 4}))
    out = tmp_path / "never"
    assert main(["export", "--weights-from", str(other), "--graphs-from", str(tiny_artifacts), "--out", str(out),
                 "--components", "unet"]) == EXIT_PROJECT_ERROR
    assert "ModelSourceError" in (err := capsys.readouterr().err) and "groups: 8 -> 4" in err
    assert not (out / "manifest.json").exists() and not list(out.glob("unet/*"))
    assert main(["export", "--weights-from", str(other), "--out", str(out)]) == EXIT_PROJECT_ERROR
    assert "InvalidArgumentError" in (err := capsys.readouterr().err) and "--graphs-from" in err
