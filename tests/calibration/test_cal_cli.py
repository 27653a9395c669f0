"""`k3trt calibrate`: parsing, the native size from the manifest's source, cache reuse, typed errors."""
from k3trt.cli.main import main

ARGS = ["--num-prompts", "2", "--heldout-prompts", "2", "--steps", "3", "--threads", "2", "--collector", "ort"]  # the fixture's


def test_rerun_with_same_settings_reuses_everything(calibrated_copy, capsys):
    assert main(["calibrate", "--artifacts", str(calibrated_copy), *ARGS]) == 0  # 64 x 64: tiny's native size
    out, err = capsys.readouterr()
    assert "reusing cached trajectories for all 2 prompts (3 steps, 64x64)" in err
    assert "reusing cached activation ranges" in err and "int8 U-Net up to date" in err
    assert "cosine mean" in out and "report: " in out


def test_bad_prompt_file_exits_2_naming_it(calibrated_copy, tmp_path, capsys):
    bad = tmp_path / "none.txt"
    assert main(["calibrate", "--artifacts", str(calibrated_copy), "--prompts", str(bad), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "InvalidArgumentError" in err and str(bad) in err
