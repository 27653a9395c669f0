"""`k3trt animate`: zoom-out/zoom-in (inpainting) and Deforum-style (image to image) videos, resumable.

Every argument is checked (schedules, sizes, components, output paths, encoders) before anything is written or any
model runs; frames go to a folder as they are made, then the videos are encoded from them (runtime/animation.py).
The library is imported only once the command runs, so `--help` loads no torch.
"""
from __future__ import annotations

import sys

from k3trt.cli.animation_store import (FrameStore, check_video_out, default_frames_dir, manifest_digest,
                                      write_contact_sheet, write_video)
from k3trt.cli.arguments import add_backend_args, add_size_args, log, open_pipeline, resolved_precision
from k3trt.contract.arguments import check_threads, parse_resolution
from k3trt.contract.errors import InvalidArgumentError
from k3trt.writing.ownership import check_output_image
from k3trt.runtime.animation_spec import (COLOR_COHERENCE, DEFAULT_FPS, DEFAULT_FRAMES, DEFAULT_FRAMES_PER_KEY,
                                          DEFORUM_STRENGTH, MODES)
from k3trt.runtime.schedules import SEED_BEHAVIORS
from k3trt.runtime.video import check_fps

DEFORUM_FLAGS = {"strength": "--strength", "zoom": "--zoom", "angle": "--angle", "translate_x": "--translate-x",
                 "translate_y": "--translate-y", "color_coherence": "--color-coherence"}
ZOOM_FLAGS = {"frames_per_key": "--frames-per-key", "zoom_margin": "--zoom-margin"}


def register(sub) -> None:
    p = sub.add_parser("animate", help="videos from the image calls: zoom-out/zoom-in by outpainting, or Deforum-"
                                       "style camera motion by image to image (docs/animation.md)")
    p.add_argument("--artifacts", required=True, metavar="ART", help="artifact directory from `k3trt export`")
    p.add_argument("--mode", choices=MODES, default="deforum", help="zoom-out/zoom-in: keyframes outpainted with the "
                   "inpainting U-Net, crops in between; deforum: each frame image to image of the moved previous one")
    p.add_argument("--prompt", required=True, help="the text, or a schedule by frame: '0: a forest; 24: a city'")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (all frames)")
    p.add_argument("--init-image", metavar="IN.png", help="the first frame (of the video's size) instead of text to "
                   "image")
    p.add_argument("--seed", default="0", help="0..2^64-1, or a schedule '0: 5; 24: 100'")
    p.add_argument("--seed-behavior", choices=SEED_BEHAVIORS, default="iter",
                   help="iter: frame f gets its key's seed + (f - key), a new noise each frame (Deforum's default); "
                        "fixed: the key's seed")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of each image call, 1..1000")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 or less: none)")
    add_size_args(p, "default: the size the artifacts were made for")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames in the video")
    p.add_argument("--fps", type=int, default=DEFAULT_FPS, help="frames per second of the video files")
    p.add_argument("--out", action="append", required=True, metavar="PATH",
                   help=".mp4 (H.264), .webp or .gif; repeat for several; a file is replaced only if k3trt wrote it")
    p.add_argument("--contact-sheet", metavar="PATH.png", help="also write a grid of frames spread over the "
                   "animation (up to 12, 128 px wide)")
    p.add_argument("--frames-dir", metavar="DIR", help="where the PNG frames and animation.json go (default: next to "
                   "the first --out, NAME-frames); a run with the same arguments resumes from the frames there")
    deforum = p.add_argument_group("deforum: numbers or schedules '0: 1.02; 24: 1.0' (linear in between)")
    deforum.add_argument("--strength", help=f"share of each frame's schedule re-run, 0 < S <= 1 (default "
                         f"{DEFORUM_STRENGTH})")
    deforum.add_argument("--zoom", help="zoom per frame, > 1 moves in (default 1)")
    deforum.add_argument("--angle", help="rotation per frame in degrees, counter-clockwise (default 0)")
    deforum.add_argument("--translate-x", help="pixels per frame, + moves the picture right (default 0)")
    deforum.add_argument("--translate-y", help="pixels per frame, + moves the picture down (default 0)")
    deforum.add_argument("--color-coherence", choices=COLOR_COHERENCE,
                         help="match each frame's colours to frame 0's in this space (default none)")
    zoom = p.add_argument_group("zoom-out / zoom-in")
    zoom.add_argument("--frames-per-key", type=int, help=f"frames from one keyframe to the next (default "
                      f"{DEFAULT_FRAMES_PER_KEY})")
    zoom.add_argument("--zoom-margin", metavar="N|XxY", help="border outpainted per side, multiples of 64 px "
                      "(default: a quarter of the side, so 1024 px frames zoom 2x per keyframe)")
    add_backend_args(p, ("ort", "trt", "openvino"))
    p.set_defaults(func=cmd_animate, scheduler="ddpm")


def mode_options(args) -> dict:
    """The options of --mode, refusing the other mode's (a typed error names the flag)."""
    mine, other = (DEFORUM_FLAGS, ZOOM_FLAGS) if args.mode == "deforum" else (ZOOM_FLAGS, DEFORUM_FLAGS)
    given = [flag for name, flag in other.items() if getattr(args, name) is not None]
    if given:
        raise InvalidArgumentError(f"{', '.join(given)} with --mode {args.mode}",
                                   accepted=f"{', '.join(mine.values())} for --mode {args.mode}",
                                   fix=f"drop {given[0]}, or choose the mode it belongs to")
    return {name: getattr(args, name) for name in mine if getattr(args, name) is not None}


def animation_options(args) -> dict:
    """Pipeline.animate's keyword arguments from the flags (the size: --resolution, else the artifacts' own)."""
    width, height = parse_resolution(args.resolution) if args.resolution else (None, None)
    return dict(mode=args.mode, frames=args.frames, seed=args.seed, seed_behavior=args.seed_behavior,
                steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt,
                width=width, height=height, init_image=args.init_image, **mode_options(args))


def cmd_animate(args) -> int:
    from k3trt.runtime.animation import plan_animation

    check_threads(args.threads, "--threads")
    fps = check_fps(args.fps)
    outs = [check_video_out(value) for value in args.out]
    sheet = check_output_image(args.contact_sheet, "--contact-sheet") if args.contact_sheet else None
    options = animation_options(args)
    pipe = open_pipeline(args)
    plan = plan_animation(pipe, args.prompt, **options)
    settings = {**plan.settings(), "artifacts_manifest_sha256": manifest_digest(pipe.manifest),
                "backend": args.backend, "precision": resolved_precision(args), "provider": args.provider}
    store = FrameStore.claim(args.frames_dir or default_frames_dir(outs[0]), settings)
    done = store.keys_done(plan)
    written = sum(len(plan.frames_of_key(k)) for k in range(done))
    if done:
        log(f"resuming: {done} of {plan.keys} keyframes ({written} frames) already in {store.folder}")
    render(pipe, plan, store, done, written)
    for path in outs:
        write_video(store, plan.frames, path, fps)
        print(path)
    if sheet:
        print(write_contact_sheet(store, plan.frames, sheet))
    print(store.folder)
    return 0


def render(pipe, plan, store, done: int, written: int) -> None:
    """Make the missing frames, one progress line per frame (the step inside it as the line's suffix)."""
    from tqdm import tqdm

    from k3trt.runtime.animation import render_frames

    bar = tqdm(total=plan.frames, initial=written, desc=f"animate ({plan.mode})", unit="frame", file=sys.stderr)

    def step(info) -> None:
        bar.set_postfix_str(f"step {info.index + 1}/{info.total}", refresh=True)

    try:
        for frame in render_frames(pipe, plan, keys_done=done, load_frame=store.load_frame, callback=step):
            store.save_frame(frame.index, frame.image)
            bar.update(1)
    finally:
        bar.close()
