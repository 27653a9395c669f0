"""`k3trt build`: the dry-run plan on the CPU, manifest records, and the missing-TensorRT error."""
from __future__ import annotations

import json

import pytest

from k3trt.engines.build import build_engines, engine_entry, is_current, remove_superseded
from k3trt.contract.engine_compat import DeviceEnv
from k3trt.engines.plan import BuildFlags, make_plan
from k3trt.writing.atomic import save_manifest
from k3trt.contract.manifest import FileRecord, Manifest, sha256_file
from k3trt.cli.main import main
from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError

FAKE_ENV = DeviceEnv("10.3.0", "NVIDIA A100-SXM4-80GB", (8, 0))


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def test_dry_run_json_1024_batch_1_to_4(tiny_artifacts, tmp_path, capsys):
    before = sha256_file(tiny_artifacts / "manifest.json")
    out = tmp_path / "plan.json"
    rc = main(["build", "--artifacts", str(tiny_artifacts), "--resolution", "1024x1024", "--batch", "1-4",
               "--dry-run", "--json", str(out)])
    assert rc == 0
    plan = json.loads(out.read_text())
    unet = plan["components"]["unet"]
    assert unet["profile"]["inputs"]["sample"] == {"min": [2, 4, 128, 128], "opt": [2, 4, 128, 128],
                                                   "max": [8, 4, 128, 128]}
    assert unet["profile"]["axes"]["context"] | {"from": None} == {"min": 1, "opt": 77, "max": 128, "from": None}
    assert unet["profile"]["inputs"]["encoder_hidden_states"]["max"] == [8, 128, 64]
    assert unet["variant"] == "fp16" and unet["strongly_typed"] and unet["file"].startswith("engines/unet-fp16-")
    assert "to be converted from onnx.unet.fp32" in unet["onnx"]  # a dry run converts nothing
    assert plan["components"]["text_encoder"]["precision"] == "bf16"
    assert plan["components"]["text_encoder"]["fp32_policy"] == "t5_norms"
    assert plan["components"]["movq_decoder"]["fp32_policy"] == "movq_norms_softmax"
    assert plan["request"]["batch"] == [1, 4] and plan["flags"]["refittable"] is False
    assert not (tiny_artifacts / "engines").exists()  # a dry run builds nothing ...
    assert sha256_file(tiny_artifacts / "manifest.json") == before  # ... and leaves the manifest alone
    assert "dry run: nothing built" in capsys.readouterr().err


def test_dry_run_without_json_prints_the_plan(tiny_artifacts, capsys):
    assert main(["build", "--artifacts", str(tiny_artifacts), "--components", "movq_decoder", "--resolution",
                 "512x512", "--static", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert list(plan["components"]) == ["movq_decoder"]
    assert plan["components"]["movq_decoder"]["profile"]["static"] is True


def test_plan_keys_are_deterministic_and_track_inputs(tiny_artifacts):
    manifest = Manifest.load(tiny_artifacts)
    a = make_plan(manifest, components="unet")
    b = make_plan(manifest, components="unet")
    c = make_plan(manifest, components="unet", flags=BuildFlags(refittable=True))
    d = make_plan(manifest, components="unet", resolutions=["768x768"])
    assert a.components[0].key == b.components[0].key
    assert len({a.components[0].key, c.components[0].key, d.components[0].key}) == 3
    assert a.components[0].builder_optimization_level == 3


def test_plan_argument_errors(tiny_artifacts, capsys):
    manifest = Manifest.load(tiny_artifacts)
    with pytest.raises(InvalidArgumentError, match="unknown component 'vae'"):
        make_plan(manifest, components="vae")
    with pytest.raises(InvalidArgumentError, match="which this build skips"):
        make_plan(manifest, components="unet", component_precision="text_encoder=fp32")
    with pytest.raises(InvalidArgumentError, match="0..5"):
        make_plan(manifest, components="unet", flags=BuildFlags(builder_optimization_level=9))
    assert main(["build", "--artifacts", str(tiny_artifacts), "--resolution", "big", "--dry-run"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_real_build_without_tensorrt_says_what_to_install(tiny_artifacts, capsys):
    before = sha256_file(tiny_artifacts / "manifest.json")
    rc = main(["build", "--artifacts", str(tiny_artifacts), "--components", "unet"])
    err = capsys.readouterr().err
    assert rc == 2 and "BackendUnavailableError" in err and "pip install 'kandinsky3-trt[gpu-cu13]'" in err
    assert sha256_file(tiny_artifacts / "manifest.json") == before
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        build_engines(make_plan(Manifest.load(tiny_artifacts), components="unet"), Manifest.load(tiny_artifacts))


def test_engine_entry_is_a_manifest_record(artifacts_copy):
    """The record format on the CPU: `file` is a FileRecord dict, so referenced_paths/verify work."""
    manifest = Manifest.load(artifacts_copy)
    plan = make_plan(manifest, components="unet", precision="fp32", flags=BuildFlags(refittable=True))
    cp = plan.components[0]
    path = artifacts_copy / cp.engine_path
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a real engine")
    entry = engine_entry(plan, cp, FileRecord.of(artifacts_copy, path), FAKE_ENV, 12.3, {"pinned_layers": 0})
    manifest.data["engines"][cp.name] = entry
    save_manifest(manifest)
    reloaded = Manifest.load(artifacts_copy)
    assert cp.engine_path in reloaded.referenced_paths()
    reloaded.verify([FileRecord(**reloaded.data["engines"]["unet-fp32"]["file"])])
    saved = reloaded.data["engines"]["unet-fp32"]
    assert saved["tensorrt"] == "10.3.0" and saved["gpu"]["compute_capability"] == [8, 0]
    assert saved["onnx_sha256"] == manifest.onnx("unet").graph.sha256
    assert saved["profile"]["sample"]["max"] == [2, 4, 128, 128] and saved["flags"]["refittable"] is True
    assert is_current(reloaded, cp, FAKE_ENV)
    assert not is_current(reloaded, cp, DeviceEnv("10.4.0", FAKE_ENV.gpu_name, (8, 0)))
    remove_superseded(reloaded, [cp.engine_path])  # still referenced: kept
    assert path.is_file()
