"""Issue 19, item 6: `calibrate --out` refuses a bad --exclude or --prompts before it copies the artifact
directory, and leaves no copy behind when it refuses."""
from k3trt.calibration.prompts import heldout_prompts
from k3trt.cli.main import main

ARGS = ["--num-prompts", "2", "--heldout-prompts", "2", "--steps", "3", "--threads", "1"]


def test_a_typo_in_exclude_is_refused_before_the_copy(artifacts_copy, tmp_path, capsys):
    out = tmp_path / "int8-art"
    code = main(["calibrate", "--artifacts", str(artifacts_copy), "--out", str(out), "--exclude", "no_such_layer",
                 *ARGS])
    assert code == 2 and "--exclude 'no_such_layer' matches none" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no copy, no staging


def test_held_out_prompts_in_the_prompt_file_are_refused_before_the_copy(artifacts_copy, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse at dusk\n" + heldout_prompts(2).prompts[0] + "\n")
    out = tmp_path / "int8-art"
    code = main(["calibrate", "--artifacts", str(artifacts_copy), "--out", str(out), "--prompts", str(prompts),
                 *ARGS])
    assert code == 2 and "held-out set" in capsys.readouterr().err
    assert not out.exists()
