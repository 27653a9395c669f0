"""Bad inputs give typed errors that name the value and the fix (item 7), through the API and the CLI."""
from __future__ import annotations

import json
import shutil

import pytest

from k3trt.export.presets import preset_spec, write_preset
from k3trt.export.sources import ModelSource, open_model_dir
from k3trt.export.writer import export_artifacts
from k3trt.cli.main import main
from k3trt.contract.errors import InvalidArgumentError, K3TRTError, ModelSourceError

from export_helpers import WEIGHT_FOLDERS, copy_model_without_weights, quiet


def assert_names(exc: K3TRTError, *needles: str) -> None:
    message = str(exc)
    for needle in needles:
        assert needle in message, (needle, message)
    assert exc.fix, message  # every refusal says how to fix it
    assert f"fix: {exc.fix}" in message


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelSourceError) as excinfo:
        open_model_dir(missing)
    assert_names(excinfo.value, str(missing), "does not exist", "--preset tiny")


def test_folder_without_model_index(tiny_model_dir, tmp_path):
    folder = copy_model_without_weights(tiny_model_dir, tmp_path / "m")
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelSourceError) as excinfo:
        open_model_dir(folder)
    assert_names(excinfo.value, str(folder), "model_index.json", "save_pretrained")


def test_folder_missing_unet(tiny_model_dir, tmp_path):
    folder = copy_model_without_weights(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelSourceError) as excinfo:
        open_model_dir(folder)
    assert_names(excinfo.value, str(folder), "unet")
    assert excinfo.value.what.endswith("lacks the sub-folder(s) unet")  # only the missing one is named
    assert "accepted: tokenizer/, text_encoder/, unet/, movq/, scheduler/" in str(excinfo.value)


def test_folder_with_only_bin_weights_refused(tiny_model_dir, tmp_path):
    folder = copy_model_without_weights(tiny_model_dir, tmp_path / "m")
    for sub in WEIGHT_FOLDERS:
        name = "pytorch_model.bin" if sub == "text_encoder" else "diffusion_pytorch_model.bin"
        (folder / sub / name).write_bytes(b"\x80\x02pickle")
    with pytest.raises(ModelSourceError) as excinfo:
        open_model_dir(folder)
    assert_names(excinfo.value, "safetensors", str(folder / "text_encoder"), ".bin", "refused")


def test_model_index_declaring_another_class_refused(tiny_model_dir, tmp_path):
    folder = copy_model_without_weights(tiny_model_dir, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError) as excinfo:
        open_model_dir(folder)
    assert_names(excinfo.value, "UNet2DConditionModel", "Kandinsky3UNet")


def test_unknown_preset():
    with pytest.raises(InvalidArgumentError) as excinfo:
        preset_spec("huge")
    assert isinstance(excinfo.value, ValueError)
    assert_names(excinfo.value, "'huge'", "accepted: tiny, small, full", "--preset tiny")


def test_full_preset_cannot_be_written(tmp_path):
    with pytest.raises(InvalidArgumentError) as excinfo:
        write_preset("full", tmp_path / "full")
    assert_names(excinfo.value, "'full'", "--describe")
    assert not (tmp_path / "full").exists()


def test_unknown_component(tiny_source, tmp_path):
    out = tmp_path / "art"
    with pytest.raises(InvalidArgumentError) as excinfo:
        export_artifacts(tiny_source, out, components=("text_encoder", "vae"), log=quiet)
    assert_names(excinfo.value, "'vae'", "accepted: text_encoder, unet, movq_decoder")
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("opset", [16, 11])
def test_opset_too_old(tiny_source, tmp_path, opset):
    out = tmp_path / "art"
    with pytest.raises(InvalidArgumentError) as excinfo:
        export_artifacts(tiny_source, out, opset=opset, log=quiet)
    assert_names(excinfo.value, f"opset {opset}", "accepted: >= 17", "--opset 19")
    assert not out.exists()


def test_cli_missing_model_folder(tmp_path, capsys):
    out = tmp_path / "X"
    assert main(["export", "--model", "/nonexistent", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [ModelSourceError]:"), err
    assert "'/nonexistent'" in err and "does not exist" in err and "fix:" in err
    assert not out.exists()


def test_cli_unknown_component_and_old_opset(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "X"
    base = ["export", "--model", str(tiny_model_dir), "--out", str(out)]
    assert main(base + ["--components", "text_encoder,vae"]) == 2
    err = capsys.readouterr().err
    assert "error [InvalidArgumentError]" in err and "'vae'" in err, err
    assert main(base + ["--opset", "13"]) == 2
    err = capsys.readouterr().err
    assert "opset 13 is too old" in err and ">= 17" in err, err
    assert not out.exists()


def test_cli_rejects_unknown_preset_as_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["export", "--preset", "huge", "--out", str(tmp_path / "X")])
    assert excinfo.value.code == 2
    assert "huge" in capsys.readouterr().err


def test_sharded_fp16_weights_are_found(tiny_model_dir, tmp_path):
    from transformers import T5EncoderModel

    folder = copy_model_without_weights(tiny_model_dir, tmp_path / "m")
    encoder = T5EncoderModel.from_pretrained(str(tiny_model_dir / "text_encoder"))
    encoder.save_pretrained(str(folder / "text_encoder"), variant="fp16", max_shard_size="200KB")
    shards = sorted(p.name for p in (folder / "text_encoder").glob("*.safetensors"))
    assert len(shards) > 1 and all(name.startswith("model.fp16-0000") for name in shards), shards
    for sub in ("unet", "movq"):
        src = tiny_model_dir / sub / "diffusion_pytorch_model.safetensors"
        shutil.copy(src, folder / sub / "diffusion_pytorch_model.fp16.safetensors")
    assert [p.name for p in ModelSource(folder, "fp16", "x").weight_files("unet")] == [
        "diffusion_pytorch_model.fp16.safetensors"]  # unsharded variant files are found

    source = open_model_dir(folder, variant="fp16")
    assert [p.name for p in source.weight_files("text_encoder")] == shards
