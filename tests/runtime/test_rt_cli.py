"""The `k3trt generate | parity | bench` commands on the tiny artifacts."""
import json

from k3trt.cli.main import main


def test_generate_writes_numbered_pngs(tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a fox", "--steps", "2",
                 "--resolution", "64x64", "--batch", "2", "--out", str(out)])
    assert code == 0
    from PIL import Image

    for i in range(2):
        assert Image.open(tmp_path / f"img-{i}.png").size == (64, 64)
    assert str(tmp_path / "img-1.png") in capsys.readouterr().out


def test_generate_bad_input_exits_2_with_typed_error(tiny_artifacts, tmp_path, capsys):
    code = main(["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a fox", "--steps", "0",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "InvalidArgumentError" in capsys.readouterr().err


def test_a_missing_variant_is_refused_before_the_progress_bar(tiny_artifacts, tmp_path, capsys):
    """The tiny artifacts have no int8 U-Net: the typed error comes alone, before any denoising step."""
    code = main(["generate", "--artifacts", str(tiny_artifacts), "--prompt", "a fox", "--steps", "2",
                 "--precision", "int8", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "no int8 ONNX variant" in err and "denoising" not in err
    assert not (tmp_path / "x.png").exists()


def test_parity_exit_status(tiny_model_dir, tiny_artifacts, tmp_path, capsys):
    from k3trt.export.presets import write_preset

    common = ["--artifacts", str(tiny_artifacts), "--prompt", "a fox", "--steps", "3", "--resolution", "64x64"]
    assert main(["parity", "--model", str(tiny_model_dir), *common, "--json", str(tmp_path / "p.json"),
                 "--report", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["ok"] is True
    assert (tmp_path / "rep" / "compare-0.png").is_file()
    other = write_preset("tiny", tmp_path / "other-seed", seed=5)  # different weights: parity must fail
    assert main(["parity", "--model", str(other), *common]) == 1
    assert "parity: FAIL" in capsys.readouterr().out


def test_bench_reports_medians_and_ratio(tiny_model_dir, tiny_artifacts, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--model", str(tiny_model_dir), "--prompt", "a",
                 "--steps", "2", "--resolution", "64x64", "--repeats", "1", "--json", str(out),
                 "--also", "openvino:fp32"]) == 0
    result = json.loads(out.read_text())
    assert result["ratio"] > 0
    for side in ("runtime", "reference"):
        assert set(result[side]) == {"text_encoder_ms", "unet_step_ms", "movq_decoder_ms", "total_ms"}
        assert result[side]["total_ms"] >= result[side]["unet_step_ms"] > 0
    limit = result["limit"]  # FLOPs per stage, GFLOP/s against a GEMM peak measured in the same run
    assert limit["unresolved_nodes"] == {} and limit["peak_gflops"]["fp32_peak"] > 0
    gflop = limit["gflop"]
    assert gflop["total"] == gflop["text_encoder"] + 2 * gflop["unet_step"] + gflop["movq_decoder"] > 0
    for side in ("runtime", "reference"):
        for stage in ("text_encoder", "unet_step", "movq_decoder", "total"):
            cols = limit[side][stage]
            expected = gflop[stage] / (result[side][f"{stage}_ms"] / 1e3)
            assert abs(cols["gflops"] - expected) < 1e-6 * expected
            assert abs(cols["percent_of_peak"] - 100 * expected / limit["peak_gflops"]["fp32_peak"]) < 1e-6
    assert result["psnr_db"] > 40  # fp32 runtime vs diffusers on the same seed
    also = result["also"]["openvino fp32"]  # timed in the same interleaved run
    assert also["psnr_db"] > 40 and also["ratio"] == result["reference"]["total_ms"] / also["total_ms"]
