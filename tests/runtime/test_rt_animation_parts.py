"""The pieces of `k3trt animate` that need no model: schedules, the camera warp, colour matching, zoom crops,
video encoding. Each is checked against what it claims to reproduce (Deforum's notation and cv2's matrix, a
scene rendered at the zoom a crop claims to show, the decoded video)."""
import numpy as np
import pytest
from PIL import Image

from animation_helpers import decode_mp4

from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime.frame_motion import camera_matrix, match_colors, match_histogram, shrink, warp_2d, zoom_between
from k3trt.contract.tensor_metrics import psnr
from k3trt.runtime.schedules import parse_numbers, parse_prompts, parse_seeds, seed_at

ZOOM_CROP_PSNR_DB = 35.0  # Lanczos crops of a smooth scene against the scene rendered at that zoom


def test_numeric_schedules_interpolate_linearly_and_hold_after_the_last_key():
    zoom = parse_numbers("zoom", "0:(1.04), 10:(1.0)", 20, 0.1, 10)  # Deforum's own notation
    assert [round(zoom.at(f), 6) for f in (0, 5, 10, 19)] == [1.04, 1.02, 1.0, 1.0]
    assert parse_numbers("zoom", "0: 1.04; 10: 1.0", 20, 0.1, 10) == zoom
    assert parse_numbers("zoom", 1.5, 20, 0.1, 10).at(7) == parse_numbers("zoom", "1.5", 20, 0.1, 10).at(7) == 1.5


def test_prompt_and_seed_schedules():
    prompts = parse_prompts("prompt", "0: a forest; 24: a city, at night", 30)
    assert [prompts.at(f) for f in (0, 23, 24, 29)] == ["a forest"] * 2 + ["a city, at night"] * 2
    assert parse_prompts("prompt", "a forest; misty", 30).keys == ((0, "a forest; misty"),)  # not a schedule
    seeds = parse_seeds("seed", "0: 5; 10: 100", 20)
    assert [seed_at(seeds, f, "iter") for f in (0, 3, 10, 12)] == [5, 8, 100, 102]  # Deforum's 'iter'
    assert [seed_at(seeds, f, "fixed") for f in (0, 3, 10, 12)] == [5, 5, 100, 100]


@pytest.mark.parametrize("parse, match", [
    (lambda: parse_numbers("zoom", "0: 1+0.002*sin(t)", 10, 0.1, 10), "math expressions"),
    (lambda: parse_numbers("zoom", "4: 1.0", 10, 0.1, 10), "starts at frame 4"),
    (lambda: parse_numbers("zoom", "0: 1; 0: 2", 10, 0.1, 10), "names frame 0 twice"),
    (lambda: parse_numbers("zoom", "0: 1; 12: 2", 10, 0.1, 10), "key at frame 12 but the animation has 10"),
    (lambda: parse_numbers("zoom", "0: 0", 10, 0.1, 10), "value 0.0 at frame 0"),
    (lambda: parse_numbers("zoom", "0 1.0", 10, 0.1, 10), "is not 'FRAME: VALUE'"),
    (lambda: parse_numbers("zoom", "", 10, 0.1, 10), "is empty"),
    (lambda: parse_prompts("prompt", "0: a forest; 5:", 10), "empty"),
    (lambda: parse_prompts("prompt", "1984: a novel", 10), "write .0: 1984: a novel. to use it as one prompt"),
    (lambda: parse_seeds("seed", "0: -3", 10), "is not 'FRAME: VALUE'|not a seed"),
    (lambda: parse_seeds("seed", 2**64 - 2, 10), "counts past 2"),
])
def test_schedule_errors_name_the_value_and_the_fix(parse, match):
    with pytest.raises(InvalidArgumentError, match=match) as err:
        parse()
    assert err.value.fix


def _noise(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_warp_reproduces_cv2_rotation_and_translation():
    image = _noise(64, 64)
    pixels = np.asarray(image)
    assert np.array_equal(np.asarray(warp_2d(image)), pixels)
    moved = np.asarray(warp_2d(image, translate_x=3, translate_y=-2))
    assert np.array_equal(moved[:-2, 3:], pixels[2:, :-3])
    assert np.array_equal(moved[:-2, :3], np.repeat(pixels[2:, :1], 3, axis=1))  # edges repeated
    # cv2.getRotationMatrix2D turns about (W // 2, H // 2) = (32, 32): a quarter turn is np.rot90 one row down
    turned = np.asarray(warp_2d(image, angle=90))
    assert np.array_equal(turned[1:], np.rot90(pixels)[:-1])
    m = camera_matrix(64, 64, angle=30, zoom=1.5, translate_x=0, translate_y=0)
    assert np.allclose(m @ [32, 32, 1], [32, 32, 1])  # the centre stays


def test_histogram_matching_gives_the_reference_histogram():
    rng = np.random.default_rng(1)
    source = rng.choice(256, 100, replace=False).astype(np.uint8).reshape(10, 10, 1)  # 100 distinct values each
    reference = rng.choice(256, 100, replace=False).astype(np.uint8).reshape(10, 10, 1)
    matched = match_histogram(source, reference)
    assert np.array_equal(np.sort(matched.ravel()), np.sort(reference.ravel()))
    assert np.array_equal(np.argsort(matched.ravel(), kind="stable"), np.argsort(source.ravel(), kind="stable"))
    image = _noise(32, 32)
    for mode in ("rgb", "hsv", "lab"):
        out = match_colors(image, Image.fromarray(np.asarray(image) // 2), mode)
        assert out.mode == "RGB" and np.asarray(out).mean() < np.asarray(image).mean() * 0.75
    assert match_colors(image, _noise(32, 32, 2), "none") is image


def _scene(size: int, half_extent: float) -> Image.Image:
    """A smooth picture over [-half_extent, half_extent]^2, sampled at pixel centres."""
    axis = (np.arange(size) + 0.5) / size * 2 * half_extent - half_extent
    x, y = np.meshgrid(axis, axis)
    rgb = np.stack([np.sin(3 * x) * np.cos(2 * y), np.cos(4 * x * y), np.sin(2 * (x + y))], axis=-1)
    return Image.fromarray(((rgb + 1) * 127.5).round().astype(np.uint8))


@pytest.mark.parametrize("progress", [0.25, 0.5, 0.75])
def test_zoom_frames_show_the_scene_at_their_zoom(progress):
    side, inner_side = 192, 64  # zoom 3 per keyframe
    inner, outer = _scene(side, 1 / 3), _scene(side, 1.0)
    outer.paste(shrink(inner, (inner_side, inner_side)), (64, 64))  # what outpainting keeps
    frame = zoom_between(inner, outer, (inner_side, inner_side), progress)
    expected = _scene(side, 1 / 3 ** (1 - progress))
    db = psnr(np.asarray(expected) / 255.0, np.asarray(frame) / 255.0)
    print(f"zoom frame at progress {progress}: {db:.1f} dB against the scene")
    assert db >= ZOOM_CROP_PSNR_DB, f"{db:.1f} dB"
    assert np.array_equal(np.asarray(zoom_between(inner, outer, (64, 64), 0)), np.asarray(inner))
    assert np.array_equal(np.asarray(zoom_between(inner, outer, (64, 64), 1)), np.asarray(outer))


@pytest.mark.parametrize("fmt", ["MP4", "WEBP", "GIF"])
def test_encoding_is_deterministic_and_decodes_to_the_frames(fmt, tmp_path):
    from k3trt.runtime.video import encode

    frames = [_noise(64, 128, seed) for seed in range(5)]
    paths = [tmp_path / f"{i}.{fmt.lower()}" for i in range(2)]
    for path in paths:
        encode(fmt, iter(frames), path, 12, comment="k3trt test")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    if fmt == "MP4":
        meta, decoded = decode_mp4(paths[0])
        assert meta["codec"].startswith("h264") and meta["fps"] == 12
    else:
        with Image.open(paths[0]) as image:
            decoded = []
            for i in range(image.n_frames):
                image.seek(i)
                decoded.append(np.asarray(image.convert("RGB")))
    assert len(decoded) == 5 and decoded[0].shape == (64, 128, 3)
    from k3trt.runtime.video import video_comment

    assert video_comment(paths[0]) == "k3trt test"


def test_zoom_margins():
    from k3trt.runtime.animation import zoom_margins

    assert zoom_margins(None, 1024, 1024) == (256, 256)  # a quarter of the side: zoom 2 per keyframe
    assert zoom_margins(None, 192, 256) == (64, 64)
    assert zoom_margins("128x64", 512, 512) == (128, 64) and zoom_margins(128, 512, 512) == (128, 128)
    for bad, match in (("100", "not a multiple of 64"), ((0, 64), "leaves one axis still"), ("ax", "N or XxY"),
                       (-64, "whole pixels")):
        with pytest.raises(InvalidArgumentError, match=match):
            zoom_margins(bad, 512, 512)
