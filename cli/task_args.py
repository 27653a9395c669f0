"""CLI glue for the image tasks: `k3trt generate --image/--strength/--mask/--outpaint/--flash`, checked before
anything loads; the work is in runtime/tasks.py."""
from __future__ import annotations

from k3trt.contract.errors import InvalidArgumentError


def add_task_args(p) -> None:
    group = p.add_argument_group("image tasks (docs/tasks.md)")
    group.add_argument("--image", metavar="IN.png", help="image to image (with --strength) or inpainting "
                                                          "(with --mask or --outpaint)")
    group.add_argument("--strength", type=float, default=None,
                       help="image to image: how much to change, 0 < S <= 1 (default 0.3, as diffusers)")
    group.add_argument("--mask", metavar="MASK.png", help="inpainting: white = repaint, black = keep")
    group.add_argument("--outpaint", metavar="left=128,right=256",
                       help="outpainting: grow the canvas by these margins (multiples of 64 px) and paint them")
    group.add_argument("--no-preserve-unmasked", action="store_true",
                       help="inpainting: return the decoder's pixels everywhere (the official pipeline's output) "
                            "instead of pasting the input back outside the mask")
    group.add_argument("--flash", action="store_true",
                       help="Kandinsky 3.1 Flash: the distilled U-Net, 4 steps, no guidance")


def task_of(args) -> str:
    """Which task the flags ask for; contradictory combinations are typed errors before any work."""
    image, mask, outpaint = getattr(args, "image", None), getattr(args, "mask", None), getattr(args, "outpaint", None)
    strength, flash = getattr(args, "strength", None), getattr(args, "flash", False)
    if flash and (image or mask or outpaint or strength is not None):
        raise InvalidArgumentError("--flash with --image/--mask/--outpaint/--strength",
                                   accepted="--flash alone (Flash is text to image)", fix="drop one of them")
    if (mask or outpaint) and not image:
        raise InvalidArgumentError("--mask/--outpaint without --image", accepted="--image IN.png with them",
                                   fix="add --image IN.png")
    if (mask or outpaint) and strength is not None:
        raise InvalidArgumentError("--strength with --mask/--outpaint",
                                   accepted="--strength for image to image only (inpainting always starts from "
                                            "noise)", fix="drop --strength")
    if flash:
        return "flash"
    if mask or outpaint:
        return "inpaint"
    return "img2img" if image else "text2img"


def run_task(pipe, task: str, args, kwargs: dict, callback):
    """Float images (N, H, W, 3) for `task` with the generation flags in `kwargs` (generation_kwargs)."""
    from k3trt.runtime import tasks

    common = dict(seed=kwargs["seed"], num_images=kwargs["num_images"], callback=callback)
    if task == "flash":
        return tasks.flash(pipe, kwargs["prompt"], height=kwargs["height"], width=kwargs["width"], **common)
    guided = dict(negative_prompt=kwargs["negative_prompt"], steps=kwargs["steps"], guidance=kwargs["guidance"])
    if task == "img2img":
        strength = 0.3 if args.strength is None else args.strength
        return tasks.img2img(pipe, kwargs["prompt"], args.image, strength=strength, **guided, **common)
    return tasks.inpaint(pipe, kwargs["prompt"], args.image, args.mask, outpaint=args.outpaint,
                         preserve_unmasked=not args.no_preserve_unmasked, **guided, **common)


def task_steps(task: str, args) -> int:
    """How many steps the progress bar counts."""
    from k3trt.runtime.images import check_strength
    from k3trt.runtime.official_sampler import FLASH_TIMESTEPS, official_timesteps

    if task == "flash":
        return len(FLASH_TIMESTEPS)
    if task == "inpaint":
        return len(official_timesteps(args.steps))
    if task == "img2img":
        return check_strength(0.3 if args.strength is None else args.strength, args.steps)
    return args.steps
