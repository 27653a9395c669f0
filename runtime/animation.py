"""Animations composed of the tested image calls: Kandinsky 3's zoom videos and Deforum-style camera motion.

- zoom-out / zoom-in (the Kandinsky 3 announcement's inpainting videos): keyframe 0 is text to image
  (`Pipeline.generate`); keyframe j + 1 is `Pipeline.inpaint(outpaint=margins)` of keyframe j shrunk into the centre
  (the new border painted, the shrunken frame kept). The frames between two keyframes are exact crops and resizes of
  them (`frame_motion.zoom_between`); zoom-in plays the same frames backwards.
- deforum (Deforum-Kandinsky's 2D mode): frame 0 is text to image; frame f is `Pipeline.img2img` of frame f - 1 moved
  by the camera (zoom, angle, translation schedules), optionally colour-matched to frame 0, with the strength,
  prompt and seed of frame f from their schedules.

Everything the user gave is checked by `plan_animation` before any model runs. `render_frames` yields frames as
they are made (bounded memory: at most two keyframes and frame 0 are held) and resumes from keyframes already made.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator

import torch
from k3trt.contract.arguments import check_choice, check_int, check_options
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.limits import default_size
from k3trt.runtime.animation_spec import (ANGLE_RANGE, COLOR_COHERENCE, DEFAULT_FRAMES, DEFAULT_FRAMES_PER_KEY,
                                          DEFORUM_STRENGTH, MAX_FRAMES, MAX_FRAMES_PER_KEY, MODES, ZOOM_RANGE)
from k3trt.runtime.frame_motion import match_colors, shrink, warp_2d, zoom_between
from k3trt.runtime.images import check_size, check_strength, load_image, parse_margins
from k3trt.runtime.request import make_request
from k3trt.runtime.schedules import Schedule, parse_numbers, parse_prompts, parse_seeds, seed_at
from k3trt.runtime.tasks import Img2ImgInputs, check_task, inpaint_inputs, require_components, task_request


@dataclasses.dataclass(frozen=True)
class AnimationFrame:
    index: int  # place in the video
    image: object  # PIL.Image, RGB
    keyframe: int  # the keyframe whose making produced this frame (resume bookkeeping)


@dataclasses.dataclass(frozen=True)
class AnimationPlan:
    """A checked animation request. `settings()` is what a resumed run must repeat to reuse frames."""
    mode: str
    frames: int
    width: int
    height: int
    steps: int
    guidance: float
    negative_prompt: str | None
    prompt: Schedule
    seed: Schedule
    seed_behavior: str
    strength: Schedule | None = None  # deforum
    motion: tuple[Schedule, ...] = ()  # deforum: zoom, angle, translate_x, translate_y
    color_coherence: str = "none"
    frames_per_key: int = 1  # zoom: frames from one keyframe to the next
    margins: tuple[int, int] = (0, 0)  # zoom: outpainted border, left/right and top/bottom, pixels
    init_image: object = None  # keyframe 0 given (PIL RGB of the frame's size) instead of text to image

    @property
    def keys(self) -> int:
        if self.mode == "deforum":
            return self.frames
        return 1 + -(-(self.frames - 1) // self.frames_per_key)

    def position(self, key: int) -> int:
        """Where keyframe `key` lies in zoom-out order (deforum: its frame)."""
        return key * self.frames_per_key

    def video_index(self, position: int) -> int:
        return self.frames - 1 - position if self.mode == "zoom-in" else position

    def key_index(self, key: int) -> int:
        """The video frame that is keyframe `key` (every keyframe but a zoom's last is one)."""
        return self.video_index(self.position(key))

    def frames_of_key(self, key: int) -> list[int]:
        """The video frames written once keyframe `key` is made."""
        if self.mode == "deforum" or key == 0:
            return [self.video_index(self.position(key))]
        first = self.position(key - 1) + 1
        return [self.video_index(p) for p in range(first, min(self.position(key), self.frames - 1) + 1)]

    @property
    def inner_size(self) -> tuple[int, int]:
        return self.width - 2 * self.margins[0], self.height - 2 * self.margins[1]

    def call_options(self, frame: int) -> dict:
        """The prompt, seed and sampling options of the image call made at video frame `frame` (a zoom's last
        keyframe may lie past the video's end: it takes the nearest frame's)."""
        frame = min(max(frame, 0), self.frames - 1)
        return dict(prompt=self.prompt.at(frame), negative_prompt=self.negative_prompt,
                    seed=seed_at(self.seed, frame, self.seed_behavior), steps=self.steps, guidance=self.guidance)

    def settings(self) -> dict:
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}  # no deep copies
        for name in ("prompt", "seed", "strength"):
            data[name] = getattr(self, name).to_json() if getattr(self, name) else None
        data["motion"] = {s.name: s.to_json() for s in self.motion}
        data["margins"] = list(self.margins)
        data["init_image"] = None if self.init_image is None else hashlib.sha256(self.init_image.tobytes()).hexdigest()
        return data


# ----------------------------------------------------------------------------------------- checking
def plan_animation(pipe, prompt, *, mode: str = "deforum", frames: int = DEFAULT_FRAMES, seed=0,
                   seed_behavior: str = "iter", steps: int = 25, guidance: float = 3.0,
                   negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
                   init_image=None, **mode_options) -> AnimationPlan:
    """Check every option against the artifacts, before any model runs (typed errors naming value and fix).
    Deforum options: strength, zoom, angle, translate_x, translate_y (numbers or schedules), color_coherence.
    Zoom options: frames_per_key, zoom_margin (pixels per side, a multiple of 64, or (x, y)). `init_image` (a path,
    PIL image or array of the frame's size) is keyframe 0 instead of text to image."""
    check_choice("mode", mode, MODES, "deforum, zoom-out or zoom-in")
    check_options(f"Pipeline.animate(mode={mode!r})", mode_options, _MODE_OPTIONS[mode])
    check_int("frames", frames, 1, MAX_FRAMES, f"e.g. --frames {DEFAULT_FRAMES}")
    size = default_size(pipe.manifest)  # sizes, steps, guidance and negative prompt: checked as `generate` does
    request = make_request("-", negative_prompt, seed=0, steps=steps, guidance=guidance,
                           height=size if height is None else height, width=size if width is None else width)
    common = dict(mode=mode, frames=frames, width=request.width, height=request.height, steps=steps,
                  guidance=float(guidance), negative_prompt=negative_prompt,
                  prompt=parse_prompts("prompt", prompt, frames), seed=parse_seeds("seed", seed, frames, seed_behavior),
                  seed_behavior=seed_behavior,
                  init_image=None if init_image is None else init_frame(init_image, request.width, request.height))
    plan = (_deforum_plan if mode == "deforum" else _zoom_plan)(common, mode_options)
    check_plan(pipe, plan, request)
    return plan


_MODE_OPTIONS = {"deforum": ("strength", "zoom", "angle", "translate_x", "translate_y", "color_coherence"),
                 "zoom-out": ("frames_per_key", "zoom_margin"), "zoom-in": ("frames_per_key", "zoom_margin")}


def _deforum_plan(common: dict, options: dict) -> AnimationPlan:
    frames, side = common["frames"], max(common["width"], common["height"])
    motion = (parse_numbers("zoom", options.get("zoom", 1.0), frames, *ZOOM_RANGE),
              parse_numbers("angle", options.get("angle", 0.0), frames, *ANGLE_RANGE),
              parse_numbers("translate_x", options.get("translate_x", 0.0), frames, -side, side),
              parse_numbers("translate_y", options.get("translate_y", 0.0), frames, -side, side))
    strength = parse_numbers("strength", options.get("strength", DEFORUM_STRENGTH), frames, 1e-9, 1.0)
    for frame in range(1, frames):
        try:
            check_strength(strength.at(frame), common["steps"])
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"the strength schedule at frame {frame}: {exc.what}", accepted=exc.accepted,
                                       fix=exc.fix) from None
    coherence = check_choice("color_coherence", options.get("color_coherence", "none"), COLOR_COHERENCE)
    return AnimationPlan(**common, strength=strength, motion=motion, color_coherence=coherence)


def _zoom_plan(common: dict, options: dict) -> AnimationPlan:
    per_key = check_int("frames_per_key", options.get("frames_per_key", DEFAULT_FRAMES_PER_KEY), 1,
                        MAX_FRAMES_PER_KEY, f"e.g. --frames-per-key {DEFAULT_FRAMES_PER_KEY}")
    width, height = common["width"], common["height"]
    margins = zoom_margins(options.get("zoom_margin"), width, height)
    check_size(height - 2 * margins[1], width - 2 * margins[0], f"the shrunken frame inside the {width}x{height} "
               f"frame with --zoom-margin {margins[0]}x{margins[1]}")
    return AnimationPlan(**common, frames_per_key=per_key, margins=margins)


def zoom_margins(value, width: int, height: int) -> tuple[int, int]:
    """The outpainted border per side: given (an int, 'N' or 'XxY' pixels, multiples of 64), else a quarter of
    each side rounded down to 64 (at least 64): 1024 px frames shrink to 512 px, a zoom of 2 per keyframe."""
    if value is None:
        return tuple(max(64, side // 4 // 64 * 64) for side in (width, height))
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    elif isinstance(value, str):
        parts = value.lower().split("x")
        if not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
            raise InvalidArgumentError(f"zoom_margin {value!r}", accepted="N or XxY pixels per side, multiples of 64",
                                       fix="e.g. --zoom-margin 128 or --zoom-margin 128x64")
        value = tuple(int(p) for p in parts) * (2 // len(parts))
    if not isinstance(value, tuple) or len(value) != 2:
        raise InvalidArgumentError(f"zoom_margin {value!r}", accepted="an int or (x, y) pixels per side",
                                   fix="e.g. zoom_margin=128")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value):
        raise InvalidArgumentError(f"zoom_margin {value!r}", accepted="whole pixels per side, multiples of 64",
                                   fix="e.g. --zoom-margin 128")
    try:
        margins = parse_margins(f"left={value[0]},top={value[1]}")  # multiples of 64, at least one > 0
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"zoom_margin {value[0]}x{value[1]}: {exc.what}", accepted=exc.accepted,
                                   fix=f"e.g. --zoom-margin {max(64, -(-max(value) // 64) * 64)}") from None
    if not margins["left"] or not margins["top"]:
        raise InvalidArgumentError(f"zoom_margin {value!r} leaves one axis still",
                                   accepted="a margin > 0 on both axes", fix="e.g. --zoom-margin 64")
    return margins["left"], margins["top"]


def check_plan(pipe, plan: AnimationPlan, request) -> None:
    """The components and shapes every call of the plan needs, checked on the artifacts before any call."""
    if plan.init_image is None:  # keyframe 0 is text to image
        require_components(pipe, "text2img")
        pipe.check_request(make_request(plan.prompt.at(0), plan.negative_prompt, steps=plan.steps,
                                        guidance=plan.guidance, height=plan.height, width=plan.width))
    if plan.frames == 1:
        return
    blank = torch.zeros(1, 3, plan.height, plan.width)  # shapes only; no model runs
    if plan.mode == "deforum":
        inputs = Img2ImgInputs(blank, plan.strength.at(1))
    else:
        inner = torch.zeros(plan.inner_size[1], plan.inner_size[0], 3).numpy()
        mx, my = plan.margins
        inputs = inpaint_inputs(inner, outpaint=f"left={mx},right={mx},top={my},bottom={my}")
    check_task(pipe, task_request(inputs, plan.prompt.at(0), plan.negative_prompt, steps=plan.steps,
                                  guidance=plan.guidance), inputs)


def init_frame(value, width: int, height: int):
    """The given first frame as 8-bit RGB, refused unless it is an image of the animation's size."""
    from PIL import Image

    pixels = load_image(value)  # typed errors: no such file, not an image, sides not multiples of 64
    h, w = pixels.shape[-2:]
    if (h, w) != (height, width):
        raise InvalidArgumentError(f"the init image is {w}x{h} px but the animation is {width}x{height}",
                                   accepted="an image of the animation's size",
                                   fix=f"resize it to {width}x{height}, or pass --resolution {w}x{h}")
    array = ((pixels[0].permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


# ----------------------------------------------------------------------------------------- making frames
def render_frames(pipe, plan: AnimationPlan, *, keys_done: int = 0, load_frame: Callable[[int], object] | None = None,
                  callback=None) -> Iterator[AnimationFrame]:
    """Frames in the order they are made. With `keys_done` = k > 0 the first k keyframes (and their frames) exist
    already: `load_frame(index)` returns the video frame `index` (a PIL image) for the keyframes still needed.
    `callback(StepInfo)` runs after every denoising step (True cancels: GenerationCancelled)."""
    check_int("keys_done", keys_done, 0, plan.keys)
    if keys_done and load_frame is None:
        raise InvalidArgumentError(f"keys_done={keys_done} without load_frame", accepted="a function index -> image",
                                   fix="pass load_frame to resume, or keys_done=0 to start over")
    render = _render_deforum if plan.mode == "deforum" else _render_zoom
    return render(pipe, plan, keys_done, load_frame, callback)


def first_frame(pipe, plan: AnimationPlan, callback=None):
    """Keyframe 0: the init image, else text to image with its frame's prompt and seed."""
    if plan.init_image is not None:
        return plan.init_image.copy()
    return pipe.generate(**plan.call_options(plan.key_index(0)), height=plan.height, width=plan.width,
                         callback=callback)[0]


def deforum_input(plan: AnimationPlan, frame: int, previous, first):
    """What frame `frame` starts from: the previous frame moved by the camera, colour-matched to frame 0."""
    zoom, angle, tx, ty = (s.at(frame) for s in plan.motion)
    moved = warp_2d(previous, angle=angle, zoom=zoom, translate_x=tx, translate_y=ty)
    return match_colors(moved, first, plan.color_coherence)


def _render_deforum(pipe, plan, keys_done, load_frame, callback) -> Iterator[AnimationFrame]:
    first = load_frame(0) if keys_done else None
    previous = load_frame(keys_done - 1) if keys_done else None
    for frame in range(keys_done, plan.frames):
        if frame == 0:
            image = first = first_frame(pipe, plan, callback)
        else:
            image = pipe.img2img(image=deforum_input(plan, frame, previous, first), strength=plan.strength.at(frame),
                                 callback=callback, **plan.call_options(frame))[0]
        yield AnimationFrame(frame, image, frame)
        previous = image


def zoom_keyframe(pipe, plan: AnimationPlan, key: int, previous, callback=None):
    """Keyframe `key` >= 1: keyframe key - 1 shrunk into the centre, the border outpainted."""
    mx, my = plan.margins
    return pipe.inpaint(image=shrink(previous, plan.inner_size), outpaint=f"left={mx},right={mx},top={my},bottom={my}",
                        callback=callback, **plan.call_options(plan.key_index(key)))[0]


def _render_zoom(pipe, plan, keys_done, load_frame, callback) -> Iterator[AnimationFrame]:
    previous = load_frame(plan.key_index(keys_done - 1)) if keys_done else None
    for key in range(keys_done, plan.keys):
        if key == 0:
            image = first_frame(pipe, plan, callback)
            yield AnimationFrame(plan.key_index(0), image, 0)
        else:
            image = zoom_keyframe(pipe, plan, key, previous, callback)
            for index in plan.frames_of_key(key):
                position = index if plan.mode == "zoom-out" else plan.frames - 1 - index
                progress = (position - plan.position(key - 1)) / plan.frames_per_key
                yield AnimationFrame(index, zoom_between(previous, image, plan.inner_size, progress), key)
        previous = image
