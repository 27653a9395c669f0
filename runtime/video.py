"""Frames to video files: MP4 (H.264 through PyAV, which ships FFmpeg's libraries), animated WebP and GIF (Pillow).

Each encoder writes into an open binary file (the caller decides where and how atomically) and takes its settings
from here, fixed: the same frames give the same bytes with the same PyAV/Pillow builds (x264 runs one thread, since
its output depends on the thread count; the MP4 muxer writes no version or time stamps). PyAV is imported only when
an MP4 is asked for (the `video` extra).
"""
from __future__ import annotations

import importlib.util
from typing import BinaryIO, Iterable, Sequence

from .errors import BackendUnavailableError, InvalidArgumentError

VIDEO_FORMATS = {".mp4": "MP4", ".webp": "WEBP", ".gif": "GIF"}
MAX_FPS = 240
H264_CRF = "18"  # visually lossless for most content (x264's scale: 0 lossless .. 51 worst, 23 its default)
H264_PRESET = "medium"
WEBP_QUALITY = 90
EXIF_SOFTWARE = 0x0131


def video_format(path) -> str:
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise InvalidArgumentError(f"video file {str(path)!r} has the extension {suffix or '(none)'!r}",
                                   accepted=", ".join(VIDEO_FORMATS), fix="e.g. --out animation.mp4")
    return VIDEO_FORMATS[suffix]


def check_encoder(fmt: str) -> None:
    """Fail before any work when the format's encoder is not installed."""
    if fmt == "MP4" and importlib.util.find_spec("av") is None:
        raise BackendUnavailableError("MP4 output needs PyAV (H.264 through the FFmpeg libraries it ships), which "
                                      "is not installed", accepted="animated WebP and GIF without it",
                                      fix="pip install 'kandinsky3-trt[video]' (or pip install av), or write "
                                          "--out animation.webp")


def check_fps(fps) -> int:
    from .validate import check_int

    return check_int("fps", fps, 1, MAX_FPS, "e.g. --fps 12")


def encode(fmt: str, frames: Iterable, handle: BinaryIO, fps: int, *, comment: str = "") -> None:
    """Write `frames` (RGB PIL images of one size, in order) as `fmt` ("MP4", "WEBP", "GIF") into `handle`."""
    if fmt == "MP4":
        encode_mp4(frames, handle, fps, comment=comment)
    else:
        encode_animated(frames, handle, fps, fmt, comment=comment)


def encode_mp4(frames: Iterable, handle: BinaryIO, fps: int, *, comment: str = "") -> None:
    """H.264 (yuv420p, CRF 18) in MP4; frames are read one at a time (bounded memory)."""
    check_encoder("MP4")
    import av

    with av.open(handle, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        if comment:
            container.metadata["comment"] = comment
        stream = None
        for image in frames:
            if stream is None:
                stream = _h264_stream(container, image.size, fps)
            for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                container.mux(packet)
        if stream is None:
            raise InvalidArgumentError("no frames to encode", fix="make at least one frame")
        for packet in stream.encode():
            container.mux(packet)


def _h264_stream(container, size: tuple[int, int], fps: int):
    from fractions import Fraction

    import av

    stream = container.add_stream("libx264", rate=Fraction(fps, 1))
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": H264_CRF, "preset": H264_PRESET}
    stream.codec_context.thread_count = 1
    stream.codec_context.flags |= av.codec.context.Flags.bitexact
    return stream


def encode_animated(frames: Iterable, handle: BinaryIO, fps: int, fmt: str, *, comment: str = "") -> None:
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
    frames[0].save(handle, format=fmt, **options)


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
        if importlib.util.find_spec("av") is None:
            return ""
        import av

        try:
            with av.open(str(path)) as container:
                return str(container.metadata.get("comment", ""))
        except (av.FFmpegError, OSError, ValueError):
            return ""
    from PIL import Image

    from .images import decode_errors

    try:
        with Image.open(path) as image:
            if fmt == "GIF":
                return image.info.get("comment", b"").decode(errors="replace")
            return str(image.getexif().get(EXIF_SOFTWARE, ""))
    except decode_errors():
        return ""
