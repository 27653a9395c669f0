"""`k3trt animate` and `Pipeline.animate` on the tiny preset (ONNX Runtime, fp32): the MP4 decodes to the frames
asked for; every keyframe equals the library call it is made of, bit for bit; the same seeds give the same file;
a run resumes from the frames on disk and refuses to resume with other arguments; bad input fails before any work."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from animation_helpers import decode_mp4

from k3trt.runtime import Pipeline
from k3trt.cli.main import main
from k3trt.runtime.frame_motion import match_colors, shrink, warp_2d

PROMPT = "a lighthouse on a cliff, watercolor"
ZOOM = ["--mode", "zoom-out", "--frames", "5", "--frames-per-key", "2", "--resolution", "192x192", "--steps", "2",
        "--seed", "11"]
DEFORUM = ["--mode", "deforum", "--frames", "4", "--resolution", "64x64", "--steps", "4", "--strength", "0.5",
           "--zoom", "0: 1.1; 3: 1.0", "--angle", "5", "--translate-x", "2", "--color-coherence", "lab",
           "--seed", "0: 7; 2: 40", "--prompt", "0: a red fox; 2: a snowy forest"]


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    return Pipeline.from_artifacts(tiny_artifacts, "ort")


def _animate(art, tmp, name: str, args: list, *outs: str) -> int:
    return main(["animate", "--artifacts", str(art), *args, *[a for o in outs or (f"{name}.mp4",)
                                                              for a in ("--out", str(tmp / o))]])


def _decode(path):
    return decode_mp4(path)[1]


def _frame(folder, index: int) -> np.ndarray:
    return np.asarray(Image.open(folder / f"frame-{index:05d}.png").convert("RGB"))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def zoom_run(tiny_artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoom")
    args = [*ZOOM, "--prompt", PROMPT, "--contact-sheet", str(tmp / "sheet.png")]
    assert _animate(tiny_artifacts, tmp, "zoom", args, "zoom.mp4", "zoom.gif") == 0
    return tmp


def test_zoom_out_writes_the_video_and_its_keyframes_are_the_library_calls(zoom_run, pipe):
    frames = _decode(zoom_run / "zoom.mp4")
    assert len(frames) == 5 and frames[0].shape == (192, 192, 3)
    with Image.open(zoom_run / "zoom.gif") as gif:
        assert gif.size == (192, 192) and gif.n_frames == 5
    folder = zoom_run / "zoom-frames"
    first = pipe.generate(PROMPT, seed=11, steps=2, height=192, width=192)[0]  # keyframe 0: text to image
    assert np.array_equal(_frame(folder, 0), np.asarray(first))
    for key, frame in ((1, 2), (2, 4)):  # keyframe k at frame 2k: outpainting keyframe k - 1 shrunk
        previous = Image.open(folder / f"frame-{frame - 2:05d}.png").convert("RGB")
        expected = pipe.inpaint(PROMPT, shrink(previous, (64, 64)), outpaint="left=64,right=64,top=64,bottom=64",
                                seed=11 + frame, steps=2, guidance=3.0)[0]
        assert np.array_equal(_frame(folder, frame), np.asarray(expected)), f"keyframe {key}"
    settings = json.loads((folder / "animation.json").read_text())["settings"]
    assert settings["mode"] == "zoom-out" and settings["margins"] == [64, 64]
    sheet = np.asarray(Image.open(zoom_run / "sheet.png"))  # 5 frames: 4 columns, 2 rows of 128 px thumbnails
    assert sheet.shape == (256, 512, 3)
    assert np.array_equal(sheet[:128, 128:256], np.asarray(Image.fromarray(_frame(folder, 1)).resize(
        (128, 128), Image.Resampling.LANCZOS)))


def test_same_seeds_same_file_and_resume(zoom_run, tiny_artifacts, tmp_path, capsys):
    args = [*ZOOM, "--prompt", PROMPT, "--frames-dir", str(tmp_path / "frames")]
    assert _animate(tiny_artifacts, tmp_path, "again", args) == 0
    assert _sha(tmp_path / "again.mp4") == _sha(zoom_run / "zoom.mp4")
    for index in (3, 4):  # as if interrupted while making the last keyframe
        (tmp_path / "frames" / f"frame-{index:05d}.png").unlink()
    before = (tmp_path / "frames" / "frame-00002.png").stat().st_mtime_ns
    assert _animate(tiny_artifacts, tmp_path, "resumed", args) == 0
    assert (tmp_path / "frames" / "frame-00002.png").stat().st_mtime_ns == before  # kept, not re-made
    assert _sha(tmp_path / "resumed.mp4") == _sha(zoom_run / "zoom.mp4")
    changed = [*args, "--steps", "3"]  # the last --steps counts
    assert _animate(tiny_artifacts, tmp_path, "other", changed) == 2
    assert "holds frames made with other arguments (steps: 2 then, 3 now)" in capsys.readouterr().err
    assert not (tmp_path / "other.mp4").exists()


def test_zoom_in_is_zoom_out_backwards(zoom_run, pipe):
    """Schedules follow the video: zoom-in's keyframe 0 is its last frame, so these seeds give zoom-out's keyframes
    (seeds 11 and 13 at its frames 0 and 2)."""
    frames = pipe.animate(PROMPT, mode="zoom-in", frames=3, frames_per_key=2, width=192, height=192, steps=2,
                          seed="0: 13; 2: 11", seed_behavior="fixed")
    forward = [_frame(zoom_run / "zoom-frames", i) for i in range(3)]
    assert len(frames) == 3 and frames[0].size == (192, 192)
    assert all(np.array_equal(np.asarray(f), g) for f, g in zip(frames, reversed(forward)))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 64 x 64 start picture, and a 128 x 128 one (the wrong size for a 64 x 64 animation)."""
    folder = tmp_path_factory.mktemp("pictures")
    y, x = np.mgrid[0:128, 0:128]
    art = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(art[:64, :64]).save(folder / "start.png")
    Image.fromarray(art).save(folder / "big.png")
    return folder


def test_deforum_writes_the_video_and_each_frame_is_img2img_of_the_moved_last(pipe, tiny_artifacts, tmp_path,
                                                                              pictures):
    args = [*DEFORUM, "--init-image", str(pictures / "start.png")]
    assert _animate(tiny_artifacts, tmp_path, "deforum", args, "deforum.mp4", "deforum.webp") == 0
    frames = _decode(tmp_path / "deforum.mp4")
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3)
    folder = tmp_path / "deforum-frames"
    first = Image.open(pictures / "start.png").convert("RGB")  # frame 0: the init image itself
    assert np.array_equal(_frame(folder, 0), np.asarray(first))
    for frame, (prompt, seed, zoom) in {1: ("a red fox", 8, 1.1 - 0.1 / 3), 2: ("a snowy forest", 40, 1.1 - 0.2 / 3),
                                        3: ("a snowy forest", 41, 1.0)}.items():
        previous = Image.open(folder / f"frame-{frame - 1:05d}.png").convert("RGB")
        start = match_colors(warp_2d(previous, angle=5, zoom=zoom, translate_x=2), first, "lab")
        expected = pipe.img2img(prompt, start, strength=0.5, seed=seed, steps=4, guidance=3.0)[0]
        assert np.array_equal(_frame(folder, frame), np.asarray(expected)), f"frame {frame}"


@pytest.mark.parametrize("args, match", [
    (["--zoom", "0: 1+sin(t)"], "math expressions"),
    (["--strength", "0: 0.5; 2: 0.1"], "strength schedule at frame 2"),
    (["--prompt", "3: late start"], "prompt starts at frame 3"),
    (["--frames-per-key", "2"], "--frames-per-key with --mode deforum"),
    (["--resolution", "64x64", "--mode", "zoom-out"], "shrunken frame"),
    (["--fps", "0"], "fps=0"),
    (["--init-image", "{big}"], "the init image is 128x128 px but the animation is 64x64"),
])
def test_bad_input_fails_before_any_work(args, match, tiny_artifacts, tmp_path, capsys, pictures):
    base = ["--mode", "deforum", "--frames", "4", "--steps", "4", "--prompt", "a fox", "--resolution", "64x64"]
    args = [a.replace("{big}", str(pictures / "big.png")) for a in args]
    assert _animate(tiny_artifacts, tmp_path, "bad", [*base, *args]) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no frames folder, no video
