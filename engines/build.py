"""Engine builds: a BuildPlan -> TensorRT engines (via Polygraphy) -> manifest entries, atomically.

Per component: parse the ONNX (strongly typed for fp32), pin the plan's fp32 nodes with layer precision
constraints (OBEY_PRECISION_CONSTRAINTS), one min/opt/max profile, build, write the plan file under a
content-keyed name, then commit the manifest. A failed build leaves the manifest and earlier engines as they
were. TensorRT and Polygraphy are imported only when a build runs.
"""
from __future__ import annotations

import contextlib
import datetime
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from k3trt.runtime.artifacts import FileRecord, Manifest, atomic_write_bytes, sha256_file
from k3trt.runtime.errors import ArtifactError

from .compat import DeviceEnv, check_precision_supported
from .plan import BuildPlan, ComponentPlan
from .trt_env import current_env, require_tensorrt, trt_logger

HEARTBEAT_S = 30.0
_METADATA_NODE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


# ----------------------------------------------------------------------------------------- layer mapping
def onnx_node_of_layer(layer_name: str, metadata: str, all_nodes: set[str]) -> str | None:
    """The ONNX node a TensorRT layer came from: the parser's metadata ("[ONNX Layer: NAME]", TensorRT >= 8.6)
    if present, else the layer name itself, else NAME_<k> (the parser's suffix for extra layers of a node)."""
    found = _METADATA_NODE.search(metadata or "")
    if found and found.group(1) in all_nodes:
        return found.group(1)
    if layer_name in all_nodes:
        return layer_name
    stem = re.fullmatch(r"(.+)_\d+", layer_name)
    return stem.group(1) if stem and stem.group(1) in all_nodes else None


def pin_fp32(network, *, fp32_nodes: set[str], all_nodes: set[str], report: dict) -> None:
    """Set precision and output types to fp32 on every float layer made from an fp32 node."""
    trt = require_tensorrt()
    floats = {trt.float32, trt.float16, trt.bfloat16}
    pinned, matched = 0, set()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        node = onnx_node_of_layer(layer.name, getattr(layer, "metadata", ""), all_nodes)
        if node not in fp32_nodes or layer.num_outputs == 0 or layer.get_output(0).dtype not in floats:
            continue
        layer.precision = trt.float32
        for out in range(layer.num_outputs):
            if layer.get_output(out).dtype in floats:
                layer.set_output_type(out, trt.float32)
        pinned += 1
        matched.add(node)
    report.update(pinned_layers=pinned, matched_nodes=len(matched), requested_nodes=len(fp32_nodes))
    if fp32_nodes and not matched:
        raise ArtifactError(f"none of the {len(fp32_nodes)} fp32 nodes matched a TensorRT layer name",
                            fix="report this with the TensorRT version; meanwhile build this component in "
                                "fp32 or bf16 (--component-precision COMPONENT=fp32)")


# ----------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def heartbeat(log: Callable[[str], None], label: str, every: float = HEARTBEAT_S):
    """Log `label` with the elapsed time every `every` seconds while the block runs."""
    stop, start = threading.Event(), time.perf_counter()

    def beat():
        while not stop.wait(every):
            log(f"  {label}: still building ({time.perf_counter() - start:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _network(plan: ComponentPlan, onnx_file: Path, report: dict):
    import onnx
    from polygraphy.backend.trt import NetworkFromOnnxPath, PostprocessNetwork

    network = NetworkFromOnnxPath(str(onnx_file), strongly_typed=plan.precision.strongly_typed)
    if not plan.fp32_layers:
        return network
    all_nodes = {n.name for n in onnx.load(str(onnx_file), load_external_data=False).graph.node}
    return PostprocessNetwork(
        network, lambda network: pin_fp32(network, fp32_nodes=set(plan.fp32_layers), all_nodes=all_nodes,
                                          report=report), name="pin-fp32-nodes")


def _config(plan: ComponentPlan, flags, timing_cache: Path):
    from polygraphy.backend.trt import CreateConfig, Profile

    trt = require_tensorrt()
    profile = Profile()
    for inp in plan.profile.inputs:
        profile.add(inp.name, min=inp.min, opt=inp.opt, max=inp.max)
    pools = ({trt.MemoryPoolType.WORKSPACE: int(flags.workspace_gb * (1 << 30))} if flags.workspace_gb else None)
    return CreateConfig(
        profiles=[profile], precision_constraints="obey" if plan.fp32_layers else None,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None, refittable=flags.refittable,
        builder_optimization_level=plan.builder_optimization_level, memory_pool_limits=pools,
        **{flag: True for flag in plan.precision.builder_flags})


def build_engine_bytes(plan: ComponentPlan, manifest: Manifest, flags, timing_cache: Path, report: dict) -> bytes:
    """Parse, configure and build one engine; returns the serialized plan."""
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    trt_logger()
    onnx_file = manifest.path(plan.onnx_path)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    network = _network(plan, onnx_file, report)
    build = EngineBytesFromNetwork(network, config=_config(plan, flags, timing_cache),
                                   save_timing_cache=str(timing_cache))
    try:
        return bytes(build())
    except PolygraphyException as exc:  # parser errors, builder failures (often out of memory)
        raise ArtifactError(f"TensorRT could not build {plan.name} from {plan.onnx_path}: {exc}",
                            fix="run `k3trt check --artifacts ART` for parser problems; for out-of-memory "
                                "builds try --workspace GB or a lower --builder-optimization-level; "
                                "existing engines were left untouched") from exc


def engine_entry(plan: BuildPlan, cp: ComponentPlan, file: FileRecord, env: DeviceEnv, seconds: float,
                 report: dict) -> dict:
    """What the manifest records about one engine (`file` is the FileRecord `referenced_paths` relies on)."""
    return {
        "component": cp.component, "precision": cp.precision.precision.value,
        "build_precision": plan.build_precision, "variant": cp.precision.variant,
        "file": file.__dict__, "onnx_path": cp.onnx_path, "onnx_sha256": cp.onnx_sha256, **env.to_dict(),
        "profile": {i.name: i.to_dict() for i in cp.profile.inputs},
        "axes": {n: [r.min, r.opt, r.max] for n, r in cp.profile.axes},
        "request": plan.request.to_dict(),
        "flags": {"builder_flags": list(cp.precision.builder_flags),
                  "strongly_typed": cp.precision.strongly_typed, "refittable": plan.flags.refittable,
                  "builder_optimization_level": cp.builder_optimization_level,
                  "workspace_gb": plan.flags.workspace_gb, "obey_precision_constraints": bool(cp.fp32_layers),
                  "fp32_policy": cp.precision.fp32_policy},
        "fp32_layers": {"nodes": len(cp.fp32_layers), **report},
        "key": cp.key, "seconds": round(seconds, 1),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "refit": None,
    }


def is_current(manifest: Manifest, cp: ComponentPlan, env: DeviceEnv) -> bool:
    entry = manifest.data["engines"].get(cp.name)
    if not entry or entry.get("key") != cp.key or entry.get("refit"):
        return False
    if entry.get("tensorrt") != env.trt_version:
        return False
    if tuple(entry.get("gpu", {}).get("compute_capability", ())) != env.compute_capability:
        return False
    path = manifest.root / entry["file"]["path"]
    return path.is_file() and sha256_file(path) == entry["file"]["sha256"]


def remove_superseded(manifest: Manifest, old_paths: Iterable[str]) -> None:
    keep = manifest.referenced_paths()
    for rel in old_paths:
        if rel and rel not in keep:
            with contextlib.suppress(OSError):
                manifest.path(rel).unlink()


def build_engines(plan: BuildPlan, manifest: Manifest, *, log: Callable[[str], None] = print) -> dict:
    """Build every engine in `plan` (skipping current ones unless forced); commit each to the manifest."""
    require_tensorrt()
    env = current_env()
    for cp in plan.components:
        check_precision_supported(cp.precision.precision, env.compute_capability, env.gpu_name)
    cache = Path(plan.flags.timing_cache) if plan.flags.timing_cache else manifest.root / "engines" / "timing.cache"
    summary = {"built": [], "up_to_date": []}
    log(f"building {len(plan.components)} engine(s) with TensorRT {env.trt_version} on {env.gpu_name} "
        f"(compute capability {env.compute_capability[0]}.{env.compute_capability[1]})")
    for cp in plan.components:
        if not plan.flags.force and is_current(manifest, cp, env):
            log(f"  {cp.name}: up to date, skipped")
            summary["up_to_date"].append(cp.name)
            continue
        label = f"{cp.name} ({'static' if cp.profile.static else 'dynamic'} profile, " \
                f"{len(cp.fp32_layers)} fp32 nodes)"
        log(f"  {label}: building ...")
        start, report = time.perf_counter(), {}
        with heartbeat(log, cp.name):
            data = build_engine_bytes(cp, manifest, plan.flags, cache, report)
        seconds = time.perf_counter() - start
        path = manifest.root / cp.engine_path
        atomic_write_bytes(path, data)  # the engine file first; the manifest commit makes it visible
        old = manifest.data["engines"].get(cp.name, {}).get("file", {}).get("path")
        manifest.data["engines"][cp.name] = engine_entry(plan, cp, FileRecord.of(manifest.root, path), env,
                                                        seconds, report)
        manifest.save()
        remove_superseded(manifest, [old] if old != cp.engine_path else [])
        log(f"  {cp.name}: done in {seconds:.0f} s, {len(data) / 2**20:.1f} MiB -> {cp.engine_path}")
        summary["built"].append(cp.name)
    return summary
