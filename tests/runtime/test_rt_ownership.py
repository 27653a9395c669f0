"""Issue 11, data loss: no command writes into, or deletes, a folder or file it did not create.

Each case of the issue is recreated: the command must refuse with a typed error (exit 2) before any work, and
the user's files must be byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from k3trt.cli.main import main
from k3trt.contract.errors import OutputPathError
from k3trt.writing.ownership import MARKER, check_output_dir, install_dir, mark, owner_kind


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def user_folder(tmp_path) -> Path:
    """A folder of someone's own files that k3trt must never touch."""
    folder = tmp_path / "thesis"
    (folder / "chapters").mkdir(parents=True)
    (folder / "chapters" / "one.tex").write_text("precious")
    (folder / "notes.txt").write_text("do not delete")
    return folder


def refuse(argv, capsys, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "OutputPathError" in err or "InvalidArgumentError" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_preset_refuses_an_unrelated_folder(user_folder, capsys):
    before = snapshot(user_folder)
    refuse(["preset", "tiny", "--out", str(user_folder)], capsys, "not written by k3trt", "fix:")
    refuse(["preset", "tiny", "--out", str(user_folder), "--force"], capsys, "not written by k3trt")
    assert snapshot(user_folder) == before


def test_preset_out_dot_refuses_the_current_folder(user_folder, capsys, monkeypatch):
    monkeypatch.chdir(user_folder)
    before = snapshot(user_folder)
    refuse(["preset", "tiny", "--out", "."], capsys, "not written by k3trt")
    assert snapshot(user_folder) == before


def test_preset_replaces_only_its_own_folder_and_only_with_force(tiny_model_dir, tmp_path, capsys):
    own = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, own)
    before = snapshot(own)
    refuse(["preset", "tiny", "--out", str(own)], capsys, "already holds a k3trt preset", "--force")
    assert snapshot(own) == before
    assert main(["preset", "tiny", "--out", str(own), "--force", "--seed", "3"]) == 0
    assert json.loads((own / "k3trt_preset.json").read_text())["seed"] == 3
    assert owner_kind(own) == "preset"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old copy left


def test_demo_refuses_a_model_folder_it_did_not_write(tmp_path, capsys):
    demo = tmp_path / "demo"
    (demo / "model").mkdir(parents=True)
    (demo / "model" / "weights.safetensors").write_text("a user's model")
    refuse(["demo", "--out", str(demo)], capsys, "not written by k3trt")  # demo/ itself is not k3trt's
    mark(demo, "demo")  # an earlier demo folder, into which someone put a model of their own
    refuse(["demo", "--out", str(demo)], capsys, "model", "not written by k3trt")
    assert (demo / "model" / "weights.safetensors").read_text() == "a user's model"


def test_export_refuses_to_write_into_the_model_folder(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = snapshot(model)
    refuse(["export", "--model", str(model), "--out", str(model)], capsys, "overlaps the input folder")
    refuse(["export", "--model", str(model), "--out", str(model / "art")], capsys, "overlaps the input folder")
    refuse(["export", "--model", str(model), "--out", str(tmp_path)], capsys, "overlaps the input folder")
    assert snapshot(model) == before


def test_export_refuses_an_unrelated_folder(tiny_model_dir, user_folder, capsys):
    before = snapshot(user_folder)
    refuse(["export", "--model", str(tiny_model_dir), "--out", str(user_folder)], capsys, "not written by k3trt")
    assert snapshot(user_folder) == before


def test_outputs_that_are_files_or_other_kinds_are_refused(tiny_artifacts, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    refuse(["preset", "tiny", "--out", str(a_file)], capsys, "is a file")
    refuse(["preset", "tiny", "--out", str(a_file / "sub")], capsys, "is a file")
    with pytest.raises(OutputPathError, match="holds a k3trt artifacts, not a preset"):
        check_output_dir(tiny_artifacts, "preset", replace=True, force=True)


def test_report_and_selftest_and_calibrate_folders(tiny_artifacts, tiny_model_dir, user_folder, capsys,
                                                   monkeypatch):
    import k3trt.cli.arguments as commands

    monkeypatch.setattr(commands, "open_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    before = snapshot(user_folder)
    refuse(["parity", "--model", str(tiny_model_dir), "--artifacts", str(tiny_artifacts), "--prompt", "a",
            "--report", str(user_folder)], capsys, "--report")
    refuse(["selftest", "--keep", str(user_folder)], capsys, "--keep")
    refuse(["calibrate", "--artifacts", str(tiny_artifacts), "--out", str(user_folder)], capsys, "--out")
    assert snapshot(user_folder) == before


def test_generate_replaces_only_images_it_wrote(tiny_artifacts, tmp_path, capsys):
    from PIL import Image

    theirs = tmp_path / "holiday.png"
    Image.new("RGB", (4, 4), "red").save(theirs)
    before = theirs.read_bytes()
    args = ["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a fox", "--steps", "1"]
    refuse([*args, "--out", str(theirs)], capsys, "was not written by k3trt")
    assert theirs.read_bytes() == before
    ours = tmp_path / "fox.png"
    assert main([*args, "--out", str(ours)]) == 0
    assert Image.open(ours).size == (64, 64)  # the tiny preset's native size, from the manifest
    assert main([*args, "--out", str(ours), "--seed", "1"]) == 0  # its own image: replaced


def test_install_dir_never_removes_a_folder_that_is_not_its_kind(tmp_path, user_folder):
    staging = tmp_path / "new"
    staging.mkdir()
    with pytest.raises(OutputPathError, match="no longer holds"):
        install_dir(staging, user_folder, "preset")
    assert (user_folder / "notes.txt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert install_dir(staging, empty, "preset") == empty and (empty / MARKER).is_file()


def test_bench_serve_and_loadtest_json_are_checked_before_work_and_replace_only_their_own(
        tiny_artifacts, tmp_path, capsys, monkeypatch):
    """`bench-serve --json` and `loadtest --json` used to overwrite any file, after the whole run."""
    import k3trt.verify.serving_bench as bench
    import k3trt.verify.loadtest as loadtest
    from k3trt.runtime.pipeline import Pipeline

    ran = []
    monkeypatch.setattr(Pipeline, "from_artifacts", lambda *a, **k: ran.append("load") or object())
    monkeypatch.setattr(bench, "bench_serving", lambda *a, **k: {"rows": [], "size": "64x64"})
    monkeypatch.setattr(bench, "format_serving", lambda result: "table")
    monkeypatch.setattr(loadtest, "run_loadtest", lambda *a, **k: ran.append("requests") or {"ok": True})
    monkeypatch.setattr(loadtest, "format_report", lambda report: "table")
    theirs = tmp_path / "results.json"
    theirs.write_text('{"mine": 1}')
    commands = {"bench-serve": ["bench-serve", "--artifacts", str(tiny_artifacts)], "loadtest": ["loadtest"]}
    for name, argv in commands.items():
        refuse([*argv, "--json", str(theirs)], capsys, "was not written by k3trt")
        refuse([*argv, "--json", str(tmp_path / "results.txt")], capsys, "extension")
        refuse([*argv, "--json", str(tmp_path)], capsys, "is a folder")
        assert theirs.read_text() == '{"mine": 1}' and not ran, name  # refused before any work
        ours = tmp_path / f"{name}.json"
        for _ in range(2):  # written atomically, tagged as k3trt's, so the second run may replace it
            assert main([*argv, "--json", str(ours)]) == 0
            assert "k3trt" in json.loads(ours.read_text())
        ran.clear()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("argv, needle", [
    (["loadtest", "--url", "http://example.com:8000"], "not a loopback address"),
    (["loadtest", "--resolution", "64"], "WIDTHxHEIGHT"),
    (["loadtest", "--warmup", "-1"], "--warmup=-1"),
    (["loadtest", "--prompt", "a\udcffb"], "not valid Unicode"),
    (["bench-serve", "--resolution", "4096x64"], "4096 px is outside"),
    (["bench-serve", "--threads", "100000"], "threads=100000"),
    (["bench-serve", "--max-batch", "1000"], "1000 images in one call"),
    (["serve", "--port", "70000"], "--port=70000"),
    (["serve", "--grace", "-1"], "--grace=-1"),
])
def test_serving_commands_check_arguments_before_work(argv, needle, tiny_artifacts, capsys, monkeypatch):
    import k3trt.cli.serve as serving_cli
    import k3trt.verify.loadtest as loadtest
    from k3trt.runtime.pipeline import Pipeline

    for target, name in ((Pipeline, "from_artifacts"), (loadtest, "run_loadtest"), (serving_cli, "run_uvicorn")):
        monkeypatch.setattr(target, name, lambda *a, **k: pytest.fail("work started"))
    if argv[0] != "loadtest":
        argv = [*argv, "--artifacts", str(tiny_artifacts)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [") and needle in err and "Traceback" not in err, err


def test_build_timing_cache_is_never_a_file_of_another_kind(tiny_artifacts, tmp_path, capsys, monkeypatch):
    """`build --timing-cache FILE` rewrites FILE after the build (TensorRT ignores a file it cannot read): a
    typo naming someone's file would have replaced it. Only FILE.cache is accepted, checked before any work."""
    import k3trt.engines.build as build

    monkeypatch.setattr(build, "build_engines", lambda *a, **k: pytest.fail("work started"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    argv = ["build", "--artifacts", str(tiny_artifacts), "--dry-run"]
    refuse([*argv, "--timing-cache", str(notes)], capsys, "does not end in .cache", "fix:")
    refuse([*argv, "--timing-cache", str(tmp_path)], capsys, "is a folder")
    assert notes.read_text() == "mine"
    assert main([*argv, "--timing-cache", str(tmp_path / "timing.cache")]) == 0  # a dry run writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
