"""Incremental re-export (item 4) and failed stages leaving the previous artifacts intact (item 5)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import k3trt.export.writer as writer
from k3trt.export.components import SPECS
from k3trt.export.sources import open_model_dir
from k3trt.export.writer import export_artifacts
from k3trt.contract.manifest import Manifest
from k3trt.cli.main import main
from k3trt.contract.errors import ValidationError

from export_helpers import impossible_fp32_bound, quiet, snapshot


def onnx_records(root) -> dict:
    return Manifest.load(root).data["onnx"]


def test_same_source_is_up_to_date_and_touches_nothing(artifacts_copy, tiny_source):
    before, records = snapshot(artifacts_copy), onnx_records(artifacts_copy)
    lines = []
    summary = export_artifacts(tiny_source, artifacts_copy, log=lines.append)
    assert summary["exported"] == [] and summary["up_to_date"] == list(SPECS)
    assert sum("up to date" in line for line in lines) == len(SPECS), lines
    assert onnx_records(artifacts_copy) == records
    after = snapshot(artifacts_copy)
    onnx_files = [p for p in before if p.endswith(".onnx")]
    assert len(onnx_files) == len(SPECS)
    for path in onnx_files:
        assert after[path] == before[path], path  # same bytes and same mtime: not rewritten
    assert set(after) == set(before)


def test_changed_movq_weights_reexport_only_movq(artifacts_copy, movq_changed_model):
    before, records = snapshot(artifacts_copy), onnx_records(artifacts_copy)
    old_movq_folder = artifacts_copy / records["movq_decoder"]["fp32"]["graph"]["path"].rsplit("/", 1)[0]
    assert old_movq_folder.is_dir()

    source = open_model_dir(movq_changed_model)
    summary = export_artifacts(source, artifacts_copy, log=quiet)
    assert summary["exported"] == ["movq_decoder", "movq_encoder"]  # both come from the movq/ weights
    assert summary["up_to_date"] == ["text_encoder", "unet", "unet_inpainting", "unet_flash"]

    manifest = Manifest.load(artifacts_copy)
    after = snapshot(artifacts_copy)
    for name in ("text_encoder", "unet", "unet_inpainting", "unet_flash"):
        assert manifest.data["onnx"][name] == records[name], name
        path = records[name]["fp32"]["graph"]["path"]
        assert after[path] == before[path], path
    new = manifest.onnx("movq_decoder")
    manifest.verify_onnx(new)
    old = records["movq_decoder"]["fp32"]
    assert new.source_hash == source.source_hash("movq") != old["source_hash"]
    assert new.export_key != old["export_key"]
    assert new.graph.sha256 != old["graph"]["sha256"]  # the changed weight is in the new graph
    assert all(case["ok"] for case in new.validation["cases"])
    # the superseded folder is garbage-collected; only the new one remains
    assert not old_movq_folder.exists()
    assert [p.name for p in (artifacts_copy / "movq_decoder").iterdir()] == [Path(new.graph.path).parent.name]
    assert manifest.data["source"]["path"] == str(movq_changed_model)
    assert not list(artifacts_copy.glob(".staging-*"))


def test_force_reexports_through_the_cli(artifacts_copy, tiny_model_dir, capsys):
    before, records = snapshot(artifacts_copy), onnx_records(artifacts_copy)
    argv = ["export", "--model", str(tiny_model_dir), "--out", str(artifacts_copy), "--components", "text_encoder"]
    assert main(argv + ["--force"]) == 0
    err = capsys.readouterr().err
    assert "text_encoder: ok" in err and "exported ['text_encoder']" in err, err
    after = snapshot(artifacts_copy)
    te_path = records["text_encoder"]["fp32"]["graph"]["path"]
    assert Manifest.load(artifacts_copy).onnx("text_encoder").graph.path == te_path  # same key, same folder
    # the export is deterministic and folders are content-addressed: identical bytes are not rewritten
    assert after[te_path] == before[te_path]
    for name in ("unet", "movq_decoder"):
        path = records[name]["fp32"]["graph"]["path"]
        assert after[path] == before[path], name
    Manifest.load(artifacts_copy).verify_onnx(Manifest.load(artifacts_copy).onnx("text_encoder"))

    assert main(argv) == 0  # without --force: nothing to do
    assert "text_encoder: up to date" in capsys.readouterr().err


def strict_validation(monkeypatch):
    """Make validation fail for real: the genuine comparison against torch with an impossible bound."""
    impossible_fp32_bound(monkeypatch, writer, "validate_component")


def test_failed_validation_leaves_artifacts_intact(artifacts_copy, tiny_source, monkeypatch):
    manifest_bytes, before = (artifacts_copy / "manifest.json").read_bytes(), snapshot(artifacts_copy)
    strict_validation(monkeypatch)
    with pytest.raises(ValidationError) as excinfo:
        # --force: the new export targets the very folder the manifest points to (same key)
        export_artifacts(tiny_source, artifacts_copy, components=("text_encoder",), force=True, log=quiet)
    failures = excinfo.value.failures
    assert len(failures) == len(SPECS["text_encoder"].validate)  # every failing case is listed
    assert all(f.startswith("text_encoder.last_hidden_state at {") for f in failures), failures
    assert "text_encoder.last_hidden_state" in str(excinfo.value)
    assert "left untouched" in str(excinfo.value)
    assert (artifacts_copy / "manifest.json").read_bytes() == manifest_bytes
    after = snapshot(artifacts_copy)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # same files, bytes
    after.pop("manifest.json"), before.pop("manifest.json")  # rewritten (same bytes) before exporting
    assert after == before  # everything else is not even rewritten
    assert not list(artifacts_copy.glob(".staging-*"))
    Manifest.load(artifacts_copy).verify_onnx(Manifest.load(artifacts_copy).onnx("text_encoder"))


def test_failed_export_from_new_source_leaves_manifest_intact(artifacts_copy, movq_changed_model, monkeypatch):
    manifest_bytes, before = (artifacts_copy / "manifest.json").read_bytes(), snapshot(artifacts_copy)
    strict_validation(monkeypatch)
    with pytest.raises(ValidationError, match="movq_decoder.image"):
        export_artifacts(open_model_dir(movq_changed_model), artifacts_copy, components=("movq_decoder",),
                         log=quiet)
    assert not list(artifacts_copy.glob(".staging-*"))
    after = snapshot(artifacts_copy)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}  # the ONNX files are intact...
    assert (artifacts_copy / "manifest.json").read_bytes() == manifest_bytes  # ...the manifest is not


def test_failed_move_keeps_previous_files(artifacts_copy, movq_changed_model, monkeypatch):
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if os.path.basename(str(src)).startswith(".staging-"):
            raise OSError("simulated failure while moving the staging folder")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(writer.os, "replace", failing_replace)
    manifest_bytes = (artifacts_copy / "manifest.json").read_bytes()
    with pytest.raises(OSError, match="simulated"):  # new weights -> new content folder -> a move is needed
        export_artifacts(open_model_dir(movq_changed_model), artifacts_copy, components=("movq_decoder",),
                         log=quiet)
    monkeypatch.setattr(writer.os, "replace", real_replace)
    assert (artifacts_copy / "manifest.json").read_bytes() == manifest_bytes
    manifest = Manifest.load(artifacts_copy)
    manifest.verify_onnx(manifest.onnx("movq_decoder"))  # the committed manifest must still be usable
