"""Frames to video files: MP4 (H.264 by the FFmpeg that imageio-ffmpeg ships), animated WebP and GIF (Pillow).

Each encoder takes its settings from here, fixed, so the same frames give the same bytes with the same
imageio-ffmpeg/Pillow builds. FFmpeg runs as its own process (imageio-ffmpeg pipes the frames to it), which is
also why the bytes hold: x264 in this process (PyAV, tried first) gave different files for the same frames after
ONNX Runtime had run in it (which leaves flush-to-zero on; toggling that mode changed x264's output too). x264
runs one thread (its output depends on the thread count) and the MP4 carries no version or time stamps.
imageio-ffmpeg is imported only when an MP4 is asked for (the `video` extra).
"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from k3trt.contract.arguments import check_int
from k3trt.contract.errors import BackendUnavailableError, InvalidArgumentError

VIDEO_FORMATS = {".mp4": "MP4", ".webp": "WEBP", ".gif": "GIF"}
MAX_FPS = 240
H264_OPTIONS = ["-crf", "18",  # visually lossless for most content (x264's scale: 0 lossless .. 51, 23 its default)
                "-preset", "medium", "-threads", "1", "-flags:v", "+bitexact", "-fflags", "+bitexact",
                "-map_metadata", "-1", "-f", "mp4"]
WEBP_QUALITY = 90
EXIF_SOFTWARE = 0x0131


def video_format(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise InvalidArgumentError(f"video file {str(path)!r} has the extension {suffix or '(none)'!r}",
                                   accepted=", ".join(VIDEO_FORMATS), fix="e.g. --out animation.mp4")
    return VIDEO_FORMATS[suffix]


def check_encoder(fmt: str) -> None:
    """Fail before any work when the format's encoder is not installed."""
    if fmt == "MP4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise BackendUnavailableError("MP4 output needs imageio-ffmpeg (it ships an FFmpeg with x264), which is not "
                                      "installed", accepted="animated WebP and GIF without it",
                                      fix="pip install 'kandinsky3-trt[video]' (or pip install imageio-ffmpeg), or "
                                          "write --out animation.webp")


def check_fps(fps) -> int:
    return check_int("fps", fps, 1, MAX_FPS, "e.g. --fps 12")


def encode(fmt: str, frames: Iterable, path: Path, fps: int, *, comment: str = "") -> None:
    """Write `frames` (RGB PIL images of one size, in order) as `fmt` ("MP4", "WEBP", "GIF") to `path`."""
    if fmt == "MP4":
        encode_mp4(frames, path, fps, comment=comment)
    else:
        encode_animated(frames, path, fps, fmt, comment=comment)


def encode_mp4(frames: Iterable, path: Path, fps: int, *, comment: str = "") -> None:
    """H.264 (yuv420p, CRF 18) in MP4; frames go to FFmpeg one at a time (bounded memory)."""
    check_encoder("MP4")
    import imageio_ffmpeg

    writer = None
    try:
        for image in frames:
            if writer is None:
                writer = imageio_ffmpeg.write_frames(
                    str(path), image.size, fps=fps, codec="libx264", quality=None, macro_block_size=1,
                    output_params=[*H264_OPTIONS, *(["-metadata", f"comment={comment}"] if comment else [])])
                writer.send(None)  # starts FFmpeg
            writer.send(image.convert("RGB").tobytes())
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise InvalidArgumentError("no frames to encode", fix="make at least one frame")


def encode_animated(frames: Iterable, path: Path, fps: int, fmt: str, *, comment: str = "") -> None:
    """Animated WebP (lossy, quality 90) or GIF (256 colours per frame), looping; Pillow needs all frames at once,
    and stores a run of identical frames as one longer frame."""
    frames: Sequence = list(frames)
    if not frames:
        raise InvalidArgumentError("no frames to encode", fix="make at least one frame")
    duration = round(1000 / fps)  # milliseconds per frame (GIF stores hundredths)
    options = dict(save_all=True, append_images=frames[1:], duration=duration, loop=0)
    if fmt == "WEBP":
        options.update(quality=WEBP_QUALITY, method=4)
        if comment:
            options.update(exif=_software_exif(comment))
    elif comment:
        options.update(comment=comment.encode())
    frames[0].save(path, format=fmt, **options)


def _software_exif(text: str):
    from PIL import Image

    exif = Image.Exif()
    exif[EXIF_SOFTWARE] = text
    return exif


def video_comment(path) -> str:
    """The comment `encode` stored in a video file (MP4 metadata, GIF comment, WebP EXIF Software); '' for a file
    without one or that does not decode (a damaged or foreign file is simply not ours)."""
    fmt = video_format(path)
    if fmt == "MP4":
        return _mp4_comment(Path(path))
    from PIL import Image

    from k3trt.runtime.images import decode_errors  # imports torch: only when a file is checked

    try:
        with Image.open(path) as image:
            if fmt == "GIF":
                return image.info.get("comment", b"").decode(errors="replace")
            return str(image.getexif().get(EXIF_SOFTWARE, ""))
    except decode_errors():
        return ""


def _mp4_comment(path: Path) -> str:
    """FFmpeg's metadata dump of the file (`-f ffmetadata`), its comment line."""
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return ""
    import imageio_ffmpeg

    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata",
                             "-"], capture_output=True, timeout=60, check=False)
    lines = result.stdout.decode(errors="replace").splitlines() if result.returncode == 0 else []
    return next((line[len("comment="):] for line in lines if line.startswith("comment=")), "")
