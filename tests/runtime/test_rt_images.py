"""Task inputs: images, masks, outpaint margins and strength, each refused with a typed error before any model."""
import numpy as np
import pytest
import torch
from PIL import Image

from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime.images import check_strength, load_image, load_mask, outpaint_canvas, parse_margins


def _png(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


def test_image_round_trip_and_range(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    image = load_image(_png(tmp_path / "a.png", pixels))
    assert image.shape == (1, 3, 64, 128) and image.min() >= -1 and image.max() <= 1
    torch.testing.assert_close(image[0].permute(1, 2, 0), torch.from_numpy(pixels) / 255.0 * 2 - 1)


def test_bad_images(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InvalidArgumentError, match="is not an image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    odd = _png(tmp_path / "odd.png", np.zeros((70, 128, 3), np.uint8))
    with pytest.raises(InvalidArgumentError, match=r"128x70 px .*fix: resize or crop it, e.g. to 128x64"):
        load_image(odd)


def test_masks(tmp_path):
    white = np.zeros((64, 64), np.uint8)
    white[:, 32:] = 255
    mask = load_mask(_png(tmp_path / "m.png", white), (64, 64))
    assert mask.shape == (1, 1, 64, 64) and mask[0, 0, 0, 40] == 1 and mask[0, 0, 0, 0] == 0
    with pytest.raises(InvalidArgumentError, match="mask is 64x64 px but the image is 128x64"):
        load_mask(tmp_path / "m.png", (64, 128))
    grey = np.full((64, 64), 128, np.uint8)
    with pytest.raises(InvalidArgumentError, match="grey"):
        load_mask(_png(tmp_path / "g.png", grey), (64, 64))
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 0] = 255
    with pytest.raises(InvalidArgumentError, match="colour"):
        load_mask(_png(tmp_path / "c.png", colour), (64, 64))
    rgb_white = np.repeat(white[..., None], 3, -1)  # a black/white RGB file is single-channel in content
    assert torch.equal(load_mask(_png(tmp_path / "w.png", rgb_white), (64, 64)), mask)


def test_outpaint_margins_and_canvas():
    assert parse_margins("left=128,right=64") == {"left": 128, "right": 64, "top": 0, "bottom": 0}
    with pytest.raises(InvalidArgumentError, match=r"left=100 is not a multiple of 64.*fix: use left=128"):
        parse_margins("left=100")
    with pytest.raises(InvalidArgumentError, match="SIDE=PIXELS"):
        parse_margins("middle=64")
    with pytest.raises(InvalidArgumentError, match="add nothing"):
        parse_margins("left=0")
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    canvas, mask = outpaint_canvas(image, parse_margins("left=64,bottom=128"))
    assert canvas.shape == (1, 3, 192, 128) and mask.shape == (1, 1, 192, 128)
    assert torch.equal(canvas[:, :, :64, 64:], image) and mask[:, :, :64, 64:].sum() == 0
    assert mask.sum() == 192 * 128 - 64 * 64


def test_strength():
    assert check_strength(0.6, 25) == 15 and check_strength(1.0, 25) == 25
    for bad in (0.0, -0.1, 1.5, "a", True):
        with pytest.raises(InvalidArgumentError, match="strength="):
            check_strength(bad, 25)
    with pytest.raises(InvalidArgumentError, match=r"runs int\(4 x 0.2\) = 0 steps.*--steps 5"):
        check_strength(0.2, 4)
