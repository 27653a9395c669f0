"""Shared by the animation tests."""
import numpy as np


def decode_mp4(path) -> tuple[dict, list[np.ndarray]]:
    """The frames FFmpeg decodes from an MP4 (imageio-ffmpeg's reader), with its stream metadata."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
