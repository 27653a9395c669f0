"""The stand-in's serialized engine ("plan"): a small self-contained container, so SaveEngine / EngineFromPath /
`Runtime.deserialize_cuda_engine` round-trip through files like real plans.

Layout: MAGIC, 8-byte little-endian header length, JSON header (TensorRT version, device, profiles, flags,
I/O, refittable weights), then the ONNX model the engine runs (external data inlined).
"""
from __future__ import annotations

import json
import struct

MAGIC = b"K3TRTSIM"  # not a real TensorRT plan; a real runtime rejects it, and it rejects real plans


class PlanError(ValueError):
    pass


def pack(header: dict, onnx_bytes: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + onnx_bytes


def unpack(data) -> tuple[dict, bytes]:
    view = memoryview(data).cast("B")
    if bytes(view[:len(MAGIC)]) != MAGIC:
        # the message TensorRT logs for a file that is not a plan of this build
        raise PlanError("Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match")
    start = len(MAGIC) + 8
    (length,) = struct.unpack("<Q", view[len(MAGIC):start])
    try:
        header = json.loads(bytes(view[start:start + length]))
    except ValueError as exc:
        raise PlanError(f"Serialization error: the plan header is damaged ({exc})") from None
    return header, bytes(view[start + length:])
