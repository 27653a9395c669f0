"""`k3trt export --low-memory`: the streamed U-Net / text-encoder export as an ordinary artifact (manifest record,
validation, up-to-date detection, `k3trt check`), its refusals before any work, and failures leaving the previous
artifacts intact."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import k3trt.export.low_memory_trace as streamed
import k3trt.export.validate as validate
from k3trt.export.components import SPECS
from k3trt.export.sources import open_model_dir
from k3trt.export.writer import export_artifacts
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.ort import cpu_session
from k3trt.cli.main import main
from k3trt.contract.errors import InvalidArgumentError, ModelSourceError, ValidationError
from k3trt.contract.tensor_metrics import compare

from export_helpers import impossible_fp32_bound, quiet, snapshot

STREAMED_PAIR = "text_encoder,unet"


def low_memory(model, out, *extra: str) -> list[str]:
    return ["export", "--model", str(model), "--out", str(out), "--low-memory", *extra]


def ort_output(manifest: Manifest, name: str, dims: dict, info: dict) -> np.ndarray:
    spec = SPECS[name]
    feeds = spec.make_inputs(dims, info, torch.Generator().manual_seed(7))
    session = cpu_session(manifest.path(manifest.onnx(name).graph.path), flush_denormals=False)
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def test_low_memory_export_is_an_ordinary_validated_artifact(tiny_model_dir, tiny_artifacts, tmp_path, capsys,
                                                             monkeypatch):
    art = tmp_path / "ART"
    assert main(low_memory(tiny_model_dir, art, "--components", STREAMED_PAIR)) == 0
    err = capsys.readouterr().err
    assert "weightless trace" in err and "exported ['text_encoder', 'unet']" in err, err
    manifest, regular = Manifest.load(art), Manifest.load(tiny_artifacts)
    for name in ("text_encoder", "unet"):
        record, reference = manifest.onnx(name), regular.onnx(name)
        manifest.verify_onnx(record)
        assert record.extra["streamed"] is True and "streamed" not in reference.extra
        assert record.external_data is not None  # always: the weights are streamed into it
        cases = record.validation["cases"]
        assert [c["dims"] for c in cases] == list(SPECS[name].validate) and all(c["ok"] for c in cases)
        assert record.validation["bound_rel_l2"] == SPECS[name].rel_l2_fp32
        assert max(c["rel_l2"] for c in cases) < 1e-5  # measured <= 1.9e-6 against the layer-streamed fp32 torch
        assert (record.inputs, record.outputs, record.axes) == (reference.inputs, reference.outputs, reference.axes)
        assert record.export_key == reference.export_key  # the same source and options: interchangeable
        nodes = [len(onnx.load(str(m.path(m.onnx(name).graph.path)), load_external_data=False).graph.node)
                 for m in (manifest, regular)]
        assert abs(nodes[0] - nodes[1]) <= 0.02 * nodes[1], nodes  # cleaned like the regular export
        info = record.extra["model_info"]
        for dims in SPECS[name].validate:  # the two graphs compute the same function (both ~1e-6 from torch)
            metrics = compare(ort_output(regular, name, dims, info), ort_output(manifest, name, dims, info))
            assert metrics.within(rel_l2=1e-5), (name, dims, metrics)
    graphs = {n: manifest.path(manifest.onnx(n).graph.path).stat().st_mtime_ns for n in ("text_encoder", "unet")}

    # up to date with and without --low-memory, even on a full disk: nothing to write, nothing checked
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    for argv in (low_memory(tiny_model_dir, art, "--components", STREAMED_PAIR),
                 ["export", "--model", str(tiny_model_dir), "--out", str(art), "--components", STREAMED_PAIR]):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "text_encoder: up to date" in err and "unet: up to date" in err and "exported nothing" in err, err
    monkeypatch.undo()
    assert Manifest.load(art).data["onnx"] == manifest.data["onnx"]
    assert {n: manifest.path(manifest.onnx(n).graph.path).stat().st_mtime_ns for n in graphs} == graphs
    assert main(low_memory(tiny_model_dir, art, "--components", "text_encoder", "--force")) == 0
    assert "text_encoder: ok" in capsys.readouterr().err
    forced = Manifest.load(art).onnx("text_encoder")  # deterministic and content-addressed: the same files
    assert (forced.graph, forced.external_data) == (manifest.onnx("text_encoder").graph,
                                                    manifest.onnx("text_encoder").external_data)
    assert main(["check", "--artifacts", str(art)]) == 0
    assert "0 error(s)" in capsys.readouterr().out


def _fp16_representable(graph_path) -> bool:
    weights = {t.name for t in onnx.load(str(graph_path), load_external_data=False).graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}  # the streamed weights (folded constants stay inline)
    model = onnx.load(str(graph_path))  # external data included (tiny)
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in weights]
    assert len(arrays) > 10 and all(a.dtype == np.float32 for a in arrays)
    return all(np.array_equal(a, a.astype(np.float16).astype(np.float32)) for a in arrays)


@pytest.fixture(scope="module")
def mixed_model(tiny_model_dir, tmp_path_factory):
    """The hub's layout: fp32 files plus sharded `*.fp16-0000N-of-0000M.safetensors` with an fp16 index, written by
    the libraries' own save_pretrained from the fp16-rounded weights."""
    from diffusers import Kandinsky3UNet, VQModel
    from transformers import T5EncoderModel

    folder = tmp_path_factory.mktemp("models") / "mixed"
    shutil.copytree(tiny_model_dir, folder)
    for sub, cls, shard in (("text_encoder", T5EncoderModel, "100KB"), ("unet", Kandinsky3UNet, "4MB"),
                            ("movq", VQModel, "100MB")):
        model = cls.from_pretrained(str(tiny_model_dir / sub)).half()
        model.save_pretrained(str(folder / sub), variant="fp16", max_shard_size=shard)
    return folder


def test_weight_files_follow_the_requested_variant(mixed_model):
    fp32, fp16 = (streamed._weight_files(mixed_model / "unet", v) for v in (None, "fp16"))
    assert fp32.keys() == fp16.keys()
    assert {p.name for p in fp32.values()} == {"diffusion_pytorch_model.safetensors"}
    assert len(set(fp16.values())) > 1 and all(".fp16-0000" in p.name for p in fp16.values())
    from safetensors.torch import load_file

    numel = sum(t.numel() for t in load_file(mixed_model / "unet" / "diffusion_pytorch_model.safetensors").values())
    sizes = {v: streamed.fp32_data_bytes(mixed_model, "unet", v) for v in (None, "fp16")}
    assert sizes[None] == sizes["fp16"] == 4 * numel  # from the headers: fp16 or fp32 files alike


def test_sharded_fp16_variant_is_streamed_from_the_fp16_files(mixed_model, tmp_path, capsys):
    art16, art32 = tmp_path / "A16", tmp_path / "A32"
    assert main(low_memory(mixed_model, art16, "--variant", "fp16", "--components", "text_encoder")) == 0
    assert main(low_memory(mixed_model, art32, "--components", "text_encoder")) == 0
    capsys.readouterr()
    m16, m32 = Manifest.load(art16), Manifest.load(art32)
    assert m16.data["source"]["variant"] == "fp16" and m32.data["source"]["variant"] is None
    for manifest in (m16, m32):
        assert all(c["ok"] for c in manifest.onnx("text_encoder").validation["cases"])
    assert _fp16_representable(m16.path(m16.onnx("text_encoder").graph.path))
    assert not _fp16_representable(m32.path(m32.onnx("text_encoder").graph.path))  # fp32 files, not the fp16 ones


def test_tied_embedding_stored_under_its_other_name(tiny_model_dir, tiny_artifacts, tmp_path, capsys):
    """transformers keeps T5's tied embedding as `shared.weight`; a checkpoint that kept `encoder.embed_tokens.weight`
    instead is the same model, and the streamed export and its reference must find it there."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    assert main(low_memory(model, tmp_path / "ART", "--components", "text_encoder")) == 0, capsys.readouterr().err
    manifest, regular = Manifest.load(tmp_path / "ART"), Manifest.load(tiny_artifacts)
    assert all(c["ok"] for c in manifest.onnx("text_encoder").validation["cases"])
    dims, info = SPECS["text_encoder"].validate[1], regular.onnx("text_encoder").extra["model_info"]
    metrics = compare(ort_output(regular, "text_encoder", dims, info), ort_output(manifest, "text_encoder", dims, info))
    assert metrics.within(rel_l2=1e-5), metrics  # the embedding was read, not left out


def test_refusals_come_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import k3trt.export.sources as sources

    def no_work(*_a, **_k):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(sources, "preset_source", no_work)
    monkeypatch.setattr(streamed, "trace_weightless", no_work)
    out = tmp_path / "X"
    cases = [
        (["export", "--preset", "tiny", "--out", str(out), "--low-memory"], "InvalidArgumentError",
         ("--low-memory with --preset tiny", "k3trt preset tiny --out DIR")),
        (low_memory(tiny_model_dir, out, "--components", "unet,unet_inpainting"), "InvalidArgumentError",
         ("cannot export unet_inpainting", "drop unet_inpainting")),
        (low_memory(tiny_model_dir, out, "--precision", "fp16"), "InvalidArgumentError",
         ("--precision fp16", "ModelOpt AutoCast", "the fp32 export is up to date")),
    ]
    for argv, error, needles in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error [{error}]:") and "fix:" in err, err
        assert all(n in err for n in needles), (needles, err)
    assert not out.exists()


def test_official_layout_is_refused(tiny_model_dir, tmp_path):
    from k3trt.export.official import open_official_dir

    from official_helpers import write_official_dir

    source = open_official_dir(write_official_dir(tmp_path / "official", tiny_model_dir))
    with pytest.raises(ModelSourceError, match="official .pt layout") as excinfo:
        export_artifacts(source, tmp_path / "X", low_memory=True, log=quiet)
    assert excinfo.value.fix and "diffusers-layout" in str(excinfo.value)
    assert not (tmp_path / "X").exists()


def test_default_components_leave_out_the_unet_variants(tiny_source):
    from k3trt.export.low_memory import low_memory_components

    lines = []
    assert low_memory_components(tiny_source, None, lines.append) == ["text_encoder", "unet", "movq_decoder",
                                                                       "movq_encoder"]
    assert "leaving out unet_inpainting, unet_flash" in lines[0]


def test_no_room_on_the_output_disk_is_refused_before_the_trace(tiny_model_dir, tmp_path, monkeypatch):
    probed = []

    def disk_usage(path):
        probed.append(path)
        return shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(streamed, "trace_weightless", lambda *a, **k: pytest.fail("traced before the disk check"))
    out = tmp_path / "new" / "ART"
    with pytest.raises(InvalidArgumentError, match="GB free") as excinfo:
        export_artifacts(open_model_dir(tiny_model_dir), out, components=["unet"], low_memory=True, log=quiet)
    assert "the export writes" in str(excinfo.value) and excinfo.value.fix
    assert probed == [tmp_path]  # where the staging folder would be made: inside ART, on its nearest parent's disk
    assert not (tmp_path / "new").exists()


def _strict_streamed_validation(monkeypatch):
    """The genuine comparison against the layer-streamed torch reference, with an impossible bound."""
    impossible_fp32_bound(monkeypatch, validate, "validate_streamed")


def _fail_mid_stream(monkeypatch):
    real, calls = streamed._append, []

    def append(handle, offset, array):
        calls.append(array.shape)
        if len(calls) == 5:
            raise OSError("simulated: disk full after 4 weights")
        return real(handle, offset, array)

    monkeypatch.setattr(streamed, "_append", append)


@pytest.mark.parametrize("failure, error", [(_fail_mid_stream, OSError), (_strict_streamed_validation, ValidationError)])
def test_failure_leaves_the_previous_artifacts_intact(failure, error, artifacts_copy, tiny_source, monkeypatch):
    manifest_bytes, before = (artifacts_copy / "manifest.json").read_bytes(), snapshot(artifacts_copy)
    failure(monkeypatch)
    with pytest.raises(error) as excinfo:  # --force: same key, so the export targets what the manifest points to
        export_artifacts(tiny_source, artifacts_copy, components=["text_encoder"], force=True, low_memory=True,
                         log=quiet)
    if error is ValidationError:
        assert all(f.startswith("text_encoder.last_hidden_state at {") for f in excinfo.value.failures)
    assert (artifacts_copy / "manifest.json").read_bytes() == manifest_bytes
    after = snapshot(artifacts_copy)
    after.pop("manifest.json"), before.pop("manifest.json")
    assert after == before  # no litter, nothing rewritten
    assert not list(artifacts_copy.rglob(".staging-*"))
    manifest = Manifest.load(artifacts_copy)
    manifest.verify_onnx(manifest.onnx("text_encoder"))
