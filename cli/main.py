"""The `k3trt` console script. Each command group registers its sub-commands here, explicitly; a command imports
its stage's work (torch, ONNX Runtime, model code) only after its arguments are checked, so `--version`, `--help`
and usage errors answer at once."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from k3trt.cli import animate, calibrate, engines, export, generate, qualify, serve, verify
from k3trt.cli.error_boundary import run_guarded
from k3trt.writing.ownership import package_version

# the order `k3trt --help` lists them in
COMMAND_GROUPS = (export, calibrate, qualify, engines, generate, animate, verify, serve)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" after every option that has a real default and does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: {action.default})".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k3trt", description="Kandinsky 3: PyTorch -> ONNX -> TensorRT, "
                                     "a lean runtime, and parity checks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    for command in sub.choices.values():  # every --help shows the defaults
        command.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("K3TRT_LOG", "WARNING"), format="%(levelname)s: %(message)s")
    for stream in (sys.stdout, sys.stderr):  # a path or prompt that is not UTF-8 must print, not crash
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    args = build_parser().parse_args(argv)  # usage errors exit 2 inside argparse
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
