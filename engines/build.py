"""Engine builds: a BuildPlan -> TensorRT engines (via Polygraphy) -> manifest entries, atomically.

Per component: parse the plan's ONNX variant as a strongly typed network (STRONGLY_TYPED on TensorRT 10; every
network on 11), one min/opt/max profile, TF32 if asked, build, write the plan file under a content-keyed name,
then commit the manifest. No precision builder flags, no precision constraints, no per-layer setters: the
precision of each layer is the type of its tensors in the ONNX (TensorRT 11 removed the rest). A failed build
leaves the manifest and earlier engines as they were. TensorRT and Polygraphy are imported only when a build
runs. NOT VERIFIED ON A GPU in this repository's CI.
"""
from __future__ import annotations

import contextlib
import datetime
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from k3trt.contract.engine_compat import DeviceEnv, check_precision_supported
from k3trt.contract.errors import ArtifactError, BackendUnavailableError
from k3trt.contract.manifest import FileRecord, Manifest, sha256_file
from k3trt.engines.plan import BuildPlan, ComponentPlan
from k3trt.runtime.tensorrt_env import current_env, require_tensorrt, trt_logger
from k3trt.writing.atomic import atomic_write_bytes, save_manifest

HEARTBEAT_S = 30.0


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


def _network(onnx_file: Path):
    from polygraphy.backend.trt import NetworkFromOnnxPath

    # strongly typed: TensorRT 10 needs the flag; TensorRT 11 keeps it and builds every network strongly typed
    return NetworkFromOnnxPath(str(onnx_file), strongly_typed=True)


def _config(plan: ComponentPlan, flags, timing_cache: Path):
    from polygraphy.backend.trt import CreateConfig, Profile

    trt = require_tensorrt()
    profile = Profile()
    for inp in plan.profile.inputs:
        profile.add(inp.name, min=inp.min, opt=inp.opt, max=inp.max)
    pools = ({trt.MemoryPoolType.WORKSPACE: int(flags.workspace_gb * (1 << 30))} if flags.workspace_gb else None)
    return CreateConfig(
        profiles=[profile], tf32=plan.precision.tf32,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None, refittable=flags.refittable,
        builder_optimization_level=plan.builder_optimization_level, memory_pool_limits=pools)


# CUDA's minimum drivers (CUDA Toolkit release notes, "CUDA Toolkit and Corresponding Driver Versions"): what a
# TensorRT wheel built for that CUDA major needs. TensorRT 11's `tensorrt` meta package installs the cu13 build.
DRIVER_FOR_CUDA = {12: "R525 (525.60.13) or newer", 13: "R580 (580.65.06) or newer"}


def installed_cuda_major() -> int | None:
    """The CUDA major of the installed TensorRT wheel (tensorrt-cu12 / tensorrt-cu13 and their -libs)."""
    import importlib.metadata as md

    for major in (13, 12):
        for name in (f"tensorrt-cu{major}", f"tensorrt-cu{major}-libs", f"tensorrt_cu{major}_libs"):
            try:
                md.version(name)
                return major
            except md.PackageNotFoundError:
                continue
    return None


def null_factory_error(what: str, trt_version: str) -> BackendUnavailableError:
    """TensorRT returns a null Builder/Runtime when the driver is too old for the CUDA its wheel was built with;
    Python sees pybind11's TypeError "factory function returned nullptr". Say which driver the wheel needs."""
    major = installed_cuda_major()
    wheel = f"the CUDA {major} build of TensorRT {trt_version}" if major else f"TensorRT {trt_version}"
    needs = "; ".join(f"CUDA {m} builds need driver {d}" for m, d in DRIVER_FOR_CUDA.items())
    return BackendUnavailableError(
        f"TensorRT could not create a {what} (it returned null): the NVIDIA driver is too old for {wheel} or no "
        f"GPU is usable", accepted=needs,
        fix="update the NVIDIA driver (`nvidia-smi` shows its version), or install the TensorRT build for the "
            "CUDA your driver supports: pip install 'kandinsky3-trt[gpu-cu12]' (driver R525+) or "
            "'kandinsky3-trt[gpu-cu13]' (driver R580+)")


def timing_cache_path(root: Path, env: DeviceEnv) -> Path:
    """The default timing cache, one per TensorRT version and compute capability: a cache is valid only for
    the TensorRT version and GPU that timed it (developer guide, "Timing Cache")."""
    major, minor = env.compute_capability
    version = "".join(c if c.isalnum() or c in "._" else "_" for c in env.trt_version)
    return root / "engines" / f"timing-trt{version}-sm{major}{minor}.cache"


def build_engine_bytes(plan: ComponentPlan, manifest: Manifest, flags, timing_cache: Path, report: dict):
    """Parse, configure and build one engine; returns the serialized plan as TensorRT's host memory (a buffer:
    written out as it is, never copied into `bytes`, which would double host RAM for a ~17 GB plan)."""
    from polygraphy import util
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    trt_logger()
    onnx_file = manifest.path(plan.onnx_path)
    network = _network(onnx_file)
    # Polygraphy writes a timing cache *path* in place (a killed build leaves it truncated) and leaves a
    # `.lock` file beside it. Given an open file it does neither (it fsyncs it, so no BytesIO): an anonymous
    # temporary file, gone even if the process is killed; the cache is replaced atomically after a good build.
    with tempfile.TemporaryFile("w+b") as cache_out:
        build = EngineBytesFromNetwork(network, config=_config(plan, flags, timing_cache),
                                       save_timing_cache=cache_out)
        try:
            engine = build()
        except TypeError as exc:  # pybind11: "factory function returned nullptr" (a null Builder)
            if "nullptr" not in str(exc):
                raise
            raise null_factory_error("Builder", require_tensorrt().__version__) from exc
        except PolygraphyException as exc:  # parser errors, builder failures (often out of memory)
            raise ArtifactError(f"TensorRT could not build {plan.name} from {plan.onnx_path}: {exc}",
                                fix="run `k3trt check --artifacts ART` for parser problems; for out-of-memory "
                                    "builds try --workspace GB or a lower --builder-optimization-level; "
                                    "existing engines and the timing cache were left untouched") from exc
        timings = util.load_file(cache_out)  # Polygraphy's reader: from the start, whatever the cursor
    if timings:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing_cache, timings)
    return engine


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
        "flags": {"strongly_typed": True, "tf32": cp.precision.tf32, "refittable": plan.flags.refittable,
                  "builder_optimization_level": cp.builder_optimization_level,
                  "workspace_gb": plan.flags.workspace_gb, "fp32_policy": cp.precision.fp32_policy},
        "fp32_nodes": len(cp.fp32_nodes),
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
    pending = [cp.name for cp in plan.components if cp.pending]
    if pending:
        raise ArtifactError(f"{pending} need converted ONNX variants that are not in the manifest yet",
                            fix="make the plan with create_variants=True (what `k3trt build` does), or run "
                                "`k3trt export ... --precision fp16,bf16`")
    for cp in plan.components:
        check_precision_supported(cp.precision.precision, env.compute_capability, env.gpu_name)
    cache = Path(plan.flags.timing_cache) if plan.flags.timing_cache else timing_cache_path(manifest.root, env)
    summary = {"built": [], "up_to_date": []}
    log(f"building {len(plan.components)} engine(s) with TensorRT {env.trt_version} on {env.gpu_name} "
        f"(compute capability {env.compute_capability[0]}.{env.compute_capability[1]})")
    for cp in plan.components:
        if not plan.flags.force and is_current(manifest, cp, env):
            log(f"  {cp.name}: up to date, skipped")
            summary["up_to_date"].append(cp.name)
            continue
        label = f"{cp.name} ({'static' if cp.profile.static else 'dynamic'} profile, from the {cp.precision.variant}" \
                f" ONNX, {len(cp.fp32_nodes)} nodes kept fp32)"
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
        save_manifest(manifest)
        remove_superseded(manifest, [old] if old != cp.engine_path else [])
        log(f"  {cp.name}: done in {seconds:.0f} s, {memoryview(data).nbytes / 2**20:.1f} MiB -> {cp.engine_path}")
        summary["built"].append(cp.name)
    return summary
