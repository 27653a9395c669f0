"""The frames folder of `k3trt animate`: PNG frames written atomically as they are made, the arguments that made
them (`animation.json`), resuming from the keyframes already complete, and the video files encoded from the frames.

A resumed run must repeat every argument that shapes the pixels (the plan, the artifacts' manifest, the backend);
fps and the video files may change, so a finished animation can be re-encoded without re-rendering.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from k3trt.contract.arguments import check_output_file
from k3trt.contract.errors import InvalidArgumentError, OutputPathError
from k3trt.runtime.video import VIDEO_FORMATS, check_encoder, encode, video_comment, video_format
from k3trt.writing.ownership import (check_output_dir, claim_output_dir, is_own_json, save_image,
                                     save_json, writer_tag)

KIND = "animation-frames"
SHEET_FRAMES, SHEET_COLUMNS, SHEET_THUMB_PX = 12, 4, 128  # a contact sheet: up to 12 frames, 128 px wide each
SETTINGS_FILE = "animation.json"


def frame_name(index: int) -> str:
    return f"frame-{index:05d}.png"


def is_own_video(path: Path) -> bool:
    return video_comment(path).startswith("k3trt")


def check_video_out(value, name: str = "--out") -> Path:
    """A video file to create or replace (only one k3trt wrote), its format's encoder installed."""
    path = check_output_file(name, value, tuple(VIDEO_FORMATS), owned=is_own_video)
    check_encoder(video_format(path))
    return path


def default_frames_dir(video: Path) -> Path:
    return video.with_name(f"{video.stem}-frames")


def manifest_digest(manifest) -> str:
    """The artifacts' identity: the manifest lists every file with its sha256."""
    return hashlib.sha256((Path(manifest.root) / "manifest.json").read_bytes()).hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    names = sorted(set(old) | set(new))
    return [f"{name}: {json.dumps(old.get(name))[:60]} then, {json.dumps(new.get(name))[:60]} now"
            for name in names if old.get(name) != new.get(name)]


class FrameStore:
    """One animation's frames folder (`claim` checks, creates and marks it; `load_frame`/`save_frame` by index)."""

    def __init__(self, folder: Path, settings: dict):
        self.folder, self.settings = folder, settings

    @classmethod
    def claim(cls, value, settings: dict, name: str = "--frames-dir") -> "FrameStore":
        """A new folder, or one holding frames made with the same settings (else a typed error naming the
        differences). Nothing is written when the settings differ."""
        folder = check_output_dir(value, KIND, name=name)
        settings = json.loads(json.dumps(settings))  # as it will read back
        recorded = folder / SETTINGS_FILE
        if recorded.is_file():
            old = json.loads(recorded.read_text(encoding="utf-8")).get("settings", {}) if is_own_json(recorded) else {}
            changed = _differences(old, settings)
            if changed:
                raise InvalidArgumentError(
                    f"{name} {str(folder)!r} holds frames made with other arguments ({'; '.join(changed[:4])})",
                    accepted="the same arguments to resume (fps and --out may change)",
                    fix=f"repeat the earlier arguments to resume, or choose a new {name}")
        elif any(folder.glob("frame-*.png")):
            raise OutputPathError(f"{name} {str(folder)!r} holds frames but no {SETTINGS_FILE}",
                                  fix=f"choose a new {name}: k3trt cannot tell which arguments made these frames")
        claim_output_dir(folder, KIND, name=name)
        save_json({"settings": settings}, recorded)
        return cls(folder, settings)

    def path(self, index: int) -> Path:
        return self.folder / frame_name(index)

    def keys_done(self, plan) -> int:
        """How many keyframes are complete: all the frames of each of them are on disk."""
        done = 0
        while done < plan.keys and all(self.path(i).is_file() for i in plan.frames_of_key(done)):
            done += 1
        return done

    def load_frame(self, index: int):
        from PIL import Image

        with Image.open(self.path(index)) as image:
            return image.convert("RGB")

    def save_frame(self, index: int, image) -> Path:
        return save_image(image, self.path(index))

    def frames(self, count: int) -> Iterator:
        """The frames 0..count-1 in order, read one at a time."""
        for index in range(count):
            yield self.load_frame(index)


def write_video(store: FrameStore, count: int, path: Path, fps: int) -> Path:
    """Encode the store's frames into `path` atomically: into a hidden file beside it, then renamed over it (a
    failure leaves any earlier file as it was and removes the partial one)."""
    import os
    import tempfile

    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".part{path.suffix}")
    os.close(fd)
    partial = Path(name)
    try:
        encode(video_format(path), store.frames(count), partial, fps, comment=writer_tag())
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def sheet_indices(count: int, wanted: int = SHEET_FRAMES) -> list[int]:
    """Up to `wanted` frames spread evenly from the first to the last."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def write_contact_sheet(store: FrameStore, count: int, path: Path) -> Path:
    """A grid of thumbnails of frames spread over the animation, left to right, top to bottom."""
    from PIL import Image

    indices = sheet_indices(count)
    first = store.load_frame(0)
    width = min(SHEET_THUMB_PX, first.width)
    height = round(first.height * width / first.width)
    columns = min(SHEET_COLUMNS, len(indices))
    rows = -(-len(indices) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for slot, index in enumerate(indices):
        thumb = store.load_frame(index).resize((width, height), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (slot % columns * width, slot // columns * height))
    return save_image(sheet, path)
