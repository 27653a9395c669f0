"""`k3trt bench --precision int8` times the int8 and the fp32 U-Net in the same run."""
import json

from k3trt.cli.main import main


def test_bench_int8_reports_int8_and_fp32_unet_medians(calibrated, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--artifacts", str(calibrated[0]), "--model", str(tiny_model_dir), "--precision", "int8",
                 "--prompt", "a", "--steps", "2", "--resolution", "64x64", "--repeats", "1",
                 "--json", str(out)]) == 0
    cmp = json.loads(out.read_text())["unet_int8_vs_fp32"]
    assert cmp["int8_unet_step_ms"] > 0 and cmp["fp32_unet_step_ms"] > 0
    assert abs(cmp["int8_speedup"] - cmp["fp32_unet_step_ms"] / cmp["int8_unet_step_ms"]) < 1e-9
    assert "int8 speed-up" in capsys.readouterr().out


def test_bench_int8_without_an_int8_unet_is_a_typed_error(tiny_artifacts, tiny_model_dir, capsys):
    code = main(["bench", "--artifacts", str(tiny_artifacts), "--model", str(tiny_model_dir), "--precision", "int8",
                 "--prompt", "a", "--steps", "1", "--resolution", "64x64", "--repeats", "1"])
    assert code == 2 and "k3trt calibrate" in capsys.readouterr().err
