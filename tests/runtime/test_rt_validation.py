"""Issue 11: every bad input is a typed error (exit 2) raised before any model loads; unexpected errors are a
short message plus a saved traceback (exit 1); seeds never alias."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from k3trt.cli.main import main
from k3trt.contract.errors import ArtifactError, InvalidArgumentError, K3TRTError
from k3trt.runtime.seeding import make_generator
from k3trt.writing.atomic import save_manifest


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Fail the test if a command gets as far as opening a pipeline or the diffusers reference."""
    import k3trt.verify.torch_reference as reference
    import k3trt.cli.arguments as commands

    monkeypatch.setattr(commands, "open_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(reference, "load_reference", lambda *a, **k: pytest.fail("the reference was loaded"))


def exit_2(argv, capsys, needle: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, (needle, err)
    assert "Traceback" not in err
    return err


GEN_CASES = [
    (["--out", "fox.gif"], "extension"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/afile/fox.png"], "is a file"),
    (["--threads", "100000", "--out", "x.png"], "threads=100000"),
    (["--threads", "0", "--out", "x.png"], "threads=0"),
    (["--threads", "-3", "--out", "x.png"], "threads=-3"),
    (["--seed", str(2**64), "--out", "x.png"], "seed="),
    (["--seed", "-1", "--out", "x.png"], "seed=-1"),
    (["--prompt", "bad \udcff bytes", "--out", "x.png"], "not valid Unicode"),
    (["--resolution", "64x4096", "--out", "x.png"], "4096 px is outside"),
    (["--steps", "0", "--out", "x.png"], "steps=0"),
    (["--batch", "1000", "--out", "x.png"], "num_images=1000"),
]


@pytest.mark.parametrize("extra, needle", GEN_CASES)
def test_generate_rejects_before_any_model_loads(extra, needle, tiny_artifacts, tmp_path, capsys,
                                                 no_model_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    base = ["generate", "--artifacts", str(tiny_artifacts), "--steps", "2"]
    if "--prompt" not in extra:
        base += ["--prompt", "a fox"]
    exit_2([*base, *extra], capsys, needle)
    assert not (tmp_path / "x.png").exists()


def test_unwritable_output_folder(tiny_artifacts, tmp_path, capsys, no_model_loading, monkeypatch):
    import k3trt.contract.arguments as validate

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(validate.os, "access", lambda p, m: False if str(p) == str(locked) else real(p, m))
    exit_2(["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a", "--out", str(locked / "x.png")],
           capsys, "is not writable")


def test_invalid_utf8_on_the_real_command_line(tiny_artifacts, tmp_path):
    argv = [sys.executable, "-m", "k3trt.cli.main", "generate", "--artifacts", str(tiny_artifacts),
            "--prompt", b"caf\xe9 \xff".decode("utf-8", "surrogateescape"), "--out", str(tmp_path / "x.png")]
    run = subprocess.run([os.fsencode(a) for a in argv], capture_output=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert b"not valid Unicode" in run.stderr and b"Traceback" not in run.stderr


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--repeats", "0"], "--repeats=0"),
    (["bench", "--repeats", "-2"], "--repeats=-2"),
    (["export", "--components", ",", "--out", "{tmp}/art"], "names nothing"),
    (["export", "--components", "unet,unet", "--out", "{tmp}/art"], "repeats a name"),
    (["export", "--opset", "99", "--out", "{tmp}/art"], "opset=99"),
    (["build", "--workspace", "-1"], "--workspace=-1"),
    (["build", "--builder-optimization-level", "9"], "=9"),
    (["build", "--components", ","], "names nothing"),
    (["generate", "--artifacts", "{tmp}/afile", "--prompt", "a", "--out", "x.png"], "is a file, not a folder"),
    (["export", "--model", "{tmp}/afile", "--out", "{tmp}/art"], "is a file, not a folder"),
])
def test_cli_arguments_are_typed_errors(argv, needle, tiny_artifacts, tiny_model_dir, tmp_path, capsys,
                                        no_model_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    command = argv[0]
    if command in ("bench", "build") and "--artifacts" not in argv:
        argv += ["--artifacts", str(tiny_artifacts)]
    if command == "bench":
        argv += ["--model", str(tiny_model_dir), "--prompt", "a"]
    if command == "export" and "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    exit_2(argv, capsys, needle)
    assert not (tmp_path / "art").exists()


# ------------------------------------------------------------------------------------------- API
def test_api_bad_input_raises_only_typed_errors(tiny_artifacts):
    from k3trt.runtime.pipeline import Pipeline

    for bad in (None, 3, b"bytes", ""):
        with pytest.raises(InvalidArgumentError):
            Pipeline.from_artifacts(bad)
    with pytest.raises(InvalidArgumentError, match="unknown option"):
        Pipeline.from_artifacts(tiny_artifacts, "ort", threds=2)
    with pytest.raises(InvalidArgumentError, match="threads=100000"):
        Pipeline.from_artifacts(tiny_artifacts, "ort", threads=100000)
    with pytest.raises(InvalidArgumentError, match="backend"):
        Pipeline.from_artifacts(tiny_artifacts, object())
    pipe = Pipeline.from_artifacts(tiny_artifacts)
    for kwargs in (dict(sed=1), dict(seed=2**64), dict(seed=1.5), dict(prompt="\ud800"), dict(prompt="a\x00b"),
                   dict(callback=3), dict(guidance=float("nan")), dict(prompt=["a"] * 100)):
        args = {"prompt": "a fox", "steps": 1, **kwargs}
        with pytest.raises(InvalidArgumentError):
            pipe.generate(args.pop("prompt"), **args)
    assert not pipe.backend.timings  # nothing ran


def test_generate_default_size_is_the_artifacts_native_size(tiny_artifacts):
    from k3trt.contract.limits import default_size, image_limits
    from k3trt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(tiny_artifacts)
    assert pipe.manifest.data["pipeline"]["native_size"] == 64 == default_size(pipe.manifest)
    limits = image_limits(pipe.manifest)
    assert (limits.min_px, limits.max_px, limits.multiple_px) == (64, 2048, 64)


# ------------------------------------------------------------------------------------------- seeds
def test_seeds_are_distinct_over_all_64_bits_and_match_torch_below_2_32():
    def noise(seed):
        return torch.randn(64, generator=make_generator(seed))

    assert torch.equal(noise(12345), torch.randn(64, generator=torch.Generator().manual_seed(12345)))
    seeds = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 1]
    draws = [noise(s) for s in seeds]
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            assert not torch.equal(draws[i], draws[j]), (seeds[i], seeds[j])
    assert torch.equal(noise(2**63), noise(2**63))  # deterministic
    assert make_generator(2**64 - 1).initial_seed() == 2**64 - 1
    for bad in (-1, 2**64, 1.0, True, "1"):
        with pytest.raises(InvalidArgumentError):
            make_generator(bad)


# ------------------------------------------------------------------------------------------- artifacts
def _write_manifest(root, data):
    (root / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: [1, 2], "the manifest is list"),
    (lambda d: "a string", "the manifest is str"),
    (lambda d: {k: v for k, v in d.items() if k != "onnx"}, "onnx is NoneType"),
    (lambda d: {**d, "schema_version": 99}, "newer k3trt"),
    (lambda d: {**d, "schema_version": "1"}, "schema version '1'"),
    (lambda d: {**d, "pipeline": {**d["pipeline"], "context_dim": "64"}}, "pipeline.context_dim"),
    (lambda d: {**d, "onnx": {**d["onnx"], "unet": {"fp32": {**d["onnx"]["unet"]["fp32"], "opset": None}}}},
     "onnx.unet.fp32.opset"),
    (lambda d: {**d, "onnx": {**d["onnx"], "unet": {"fp32": {k: v for k, v in d["onnx"]["unet"]["fp32"].items()
                                                             if k != "graph"}}}}, "lacks the key 'graph'"),
    (lambda d: {**d, "tokenizer": {**d["tokenizer"], "sha256": 5}}, "tokenizer.sha256"),
])
def test_malformed_manifests_are_artifact_errors(mutate, needle, artifacts_copy, tmp_path, capsys):
    from k3trt.contract.manifest import Manifest

    data = json.loads((artifacts_copy / "manifest.json").read_text())
    _write_manifest(artifacts_copy, mutate(data))
    with pytest.raises(ArtifactError) as info:
        Manifest.load(artifacts_copy)
    assert needle in str(info.value)
    exit_2(["generate", "--artifacts", str(artifacts_copy), "--prompt", "a", "--out", str(tmp_path / "x.png")],
           capsys, "ArtifactError")


def test_corrupt_onnx_with_a_matching_hash_is_an_artifact_error(artifacts_copy, tmp_path, capsys):
    from k3trt.contract.manifest import Manifest, sha256_file

    manifest = Manifest.load(artifacts_copy)
    record = manifest.data["onnx"]["text_encoder"]["fp32"]
    graph = artifacts_copy / record["graph"]["path"]
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])  # truncated ...
    record["graph"].update(sha256=sha256_file(graph), bytes=graph.stat().st_size)  # ... and re-hashed
    save_manifest(manifest)
    exit_2(["generate", "--artifacts", str(artifacts_copy), "--prompt", "a", "--steps", "1",
            "--out", str(tmp_path / "x.png")], capsys, "not a readable ONNX model")


def test_check_verifies_hashes(artifacts_copy, capsys):
    from k3trt.contract.manifest import Manifest

    manifest = Manifest.load(artifacts_copy)
    graph = artifacts_copy / manifest.data["onnx"]["movq_decoder"]["fp32"]["graph"]["path"]
    graph.write_bytes(graph.read_bytes() + b"\0")
    (artifacts_copy / manifest.data["tokenizer"]["path"]).write_text("{}")
    assert main(["check", "--artifacts", str(artifacts_copy)]) == 1
    out = capsys.readouterr().out
    assert "[integrity]" in out and "movq_decoder/fp32" in out and "tokenizer:" in out
    assert "0 error(s)" not in out


def test_stale_staging_of_a_dead_writer_is_removed_and_a_live_writer_locks(artifacts_copy):
    from k3trt.writing.locking import artifact_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = artifacts_copy / f".staging-unet-{dead.stdout.strip()}-abc"
    (stale / "sub").mkdir(parents=True)
    legacy = artifacts_copy / ".staging-movq_decoder-x1y2"  # written before names carried a pid
    legacy.mkdir()
    temp = artifacts_copy / ".manifest.json.1234.tmp"
    temp.write_text("half")
    with artifact_lock(artifacts_copy):
        assert not stale.exists() and not legacy.exists() and not temp.exists()
        with pytest.raises(ArtifactError, match="being written by another k3trt command"):
            with artifact_lock(artifacts_copy):
                pass
    with artifact_lock(artifacts_copy):  # released when the first writer ends
        pass


# ------------------------------------------------------------------------------------------- boundary
def test_unexpected_errors_are_short_with_a_saved_traceback(tiny_artifacts, tmp_path, capsys, monkeypatch):
    import k3trt.cli.generate as commands
    from tqdm import tqdm

    def broken(args):
        bar = tqdm(total=3, desc="denoising", leave=False)
        bar.update(1)
        raise RuntimeError("boom in a kernel")

    monkeypatch.setenv("K3TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(commands, "cmd_generate", broken)
    code = main(["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert "internal error [RuntimeError]: boom in a kernel" in err and "Traceback" not in err
    saved = list((tmp_path / "cache" / "errors").glob("k3trt-traceback-*.txt"))
    assert len(saved) == 1 and str(saved[0]) in err
    assert "Traceback" in saved[0].read_text() and "boom in a kernel" in saved[0].read_text()
    assert not getattr(tqdm, "_instances", set())  # the bar was closed before the message


def test_every_project_error_is_exit_2(capsys, monkeypatch):
    import k3trt.cli.generate as commands

    def raises(args):
        raise K3TRTError("something the user can fix", fix="do that")

    monkeypatch.setattr(commands, "cmd_generate", raises)
    exit_2(["generate", "--artifacts", "a", "--prompt", "a", "--out", "x.png"], capsys, "error [K3TRTError]")


def test_version_and_help_show_defaults_and_describe_every_option(capsys):
    """Walks every subcommand's parser: each option is described, each real default is shown in --help, and
    the only hidden options are old spellings that are refused."""
    import argparse

    from k3trt.cli.main import build_parser
    from k3trt.cli.arguments import RenamedOption

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("k3trt ")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"generate", "export", "build", "calibrate", "serve", "bench-serve", "loadtest"} <= set(sub.choices)
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            where = f"k3trt {name} {(action.option_strings or [action.dest])[0]}"
            if action.dest == "help":
                continue
            if action.help == argparse.SUPPRESS:
                assert isinstance(action, RenamedOption), f"{where} is hidden"
                continue
            assert action.help and action.help.strip(), f"{where} has no description"
            shown = formatter._get_help_string(action)  # what --help prints for it
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown, f"{where}: its default {action.default!r} is not shown: {shown!r}"
        command.format_help()  # every help renders (a stray % in a help text would raise here)
    text = sub.choices["generate"].format_help()
    assert "(default: 25)" in text and "(default: 0)" in text and "--height" not in text


@pytest.mark.parametrize("argv, spelling", [
    (["generate", "--height", "64"], "--resolution WxH"),
    (["generate", "--width", "64"], "--resolution WxH"),
    (["generate", "--num-images", "2"], "--batch N"),
    (["parity", "--height", "64"], "--resolution WxH"),
    (["bench", "--width", "64"], "--resolution WxH"),
    (["calibrate", "--height", "64"], "--resolution WxH"),
    (["bench-serve", "--height", "64"], "--resolution WxH"),
    (["loadtest", "--size", "64x64"], "--resolution WxH"),
    (["serve", "--default-size", "64x64"], "--default-resolution WxH"),
])
def test_one_spelling_for_size_and_batch(argv, spelling, capsys):
    """Issue 11: --resolution WxH and --batch N in every command; the old spellings are refused, naming the new."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{argv[1]} is not an option of k3trt {argv[0]}: give {spelling}" in err, err
