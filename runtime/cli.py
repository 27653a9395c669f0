"""The `k3trt` console script. Each stage registers its own sub-commands; their work is imported lazily."""
from __future__ import annotations

import argparse
import importlib
import sys

from .boundary import run_guarded
from .outputs import package_version

STAGE_CLIS = ("k3trt.export.cli", "k3trt.calibration.cli", "k3trt.engines.cli", "k3trt.runtime.commands",
              "k3trt.runtime.animate_cli", "k3trt.runtime.serving.cli")


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
    for module in STAGE_CLIS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a stage CLI that exists but fails to import is a real bug
                raise
    for command in sub.choices.values():  # every --help shows the defaults
        command.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
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
