"""The `k3trt` console script. Each stage registers its own sub-commands; their work is imported lazily."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import K3TRTError

STAGE_CLIS = ("k3trt.export.cli", "k3trt.calibration.cli", "k3trt.engines.cli", "k3trt.runtime.commands",
              "k3trt.runtime.serving.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k3trt", description="Kandinsky 3: PyTorch -> ONNX -> TensorRT, "
                                     "a lean runtime, and parity checks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in STAGE_CLIS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a stage CLI that exists but fails to import is a real bug
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except K3TRTError as exc:
        print(f"error [{type(exc).__name__}]: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
