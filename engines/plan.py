"""The build plan: everything an engine build will do, computed on the CPU from the manifest and the request.

A plan is frozen and serializable (`k3trt build --dry-run --json FILE` writes it). The real build consumes
exactly this object, so what the dry run shows is what gets built. Each component plan carries a content
key over its inputs (ONNX hash, profile, precision, flags, fp32 layers): an unchanged key means no work.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from k3trt.contract.cards import COMPONENTS
from k3trt.contract.errors import InvalidArgumentError
from k3trt.contract.manifest import Manifest, sha256_json
from k3trt.contract.precision import Precision, resolve_precision
from k3trt.engines.build_precision import QUANTIZED, ComponentPrecision, parse_component_precision, select_precisions
from k3trt.engines.profiles import ComponentProfile, ProfileRequest, derive_profile, make_request

PLAN_FORMAT = 1
DEFAULT_OPT_LEVEL = 3  # TensorRT's default; the Diffusion demo's choice for fp16
QUANTIZED_OPT_LEVEL = 4  # the demo raises it for int8/fp8, where tactic choice matters more


@dataclasses.dataclass(frozen=True)
class BuildFlags:
    timing_cache: str | None = None
    refittable: bool = False
    builder_optimization_level: int | None = None  # None: 3, or 4 for int8/fp8
    workspace_gb: float | None = None  # None: TensorRT's default (the GPU's memory)
    force: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ComponentPlan:
    component: str
    precision: ComponentPrecision
    onnx_path: str | None  # relative to the artifact directory; None: the variant is made at build time
    onnx_sha256: str | None
    profile: ComponentProfile
    fp32_nodes: tuple[str, ...]  # nodes the variant keeps fp32 (recorded by the converter; informational)
    builder_optimization_level: int
    key: str

    @property
    def name(self) -> str:  # manifest key: one current engine per component and precision
        return f"{self.component}-{self.precision.precision.value}"

    @property
    def engine_path(self) -> str:
        return f"engines/{self.name}-{self.key[:12]}.plan"

    def to_dict(self) -> dict:
        return {"engine": self.name, "file": self.engine_path,
                "onnx": self.onnx_path or f"(to be converted from onnx.{self.component}.fp32 at build time)",
                "onnx_sha256": self.onnx_sha256, **self.precision.to_dict(),
                "builder_optimization_level": self.builder_optimization_level,
                "profile": self.profile.to_dict(), "fp32_nodes": len(self.fp32_nodes), "key": self.key}

    @property
    def pending(self) -> bool:
        """The converted variant this engine needs is not in the manifest yet."""
        return self.onnx_path is None


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    artifacts: str
    build_precision: str  # the global --precision, or "default"
    request: ProfileRequest
    flags: BuildFlags
    components: tuple[ComponentPlan, ...]

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "artifacts": self.artifacts, "build_precision": self.build_precision,
                "request": self.request.to_dict(), "flags": self.flags.to_dict(),
                "components": {c.component: c.to_dict() for c in self.components}}


def parse_components(text: str | Iterable[str] | None, available: Iterable[str]) -> tuple[str, ...]:
    available = list(available)
    if text is None:
        return tuple(c for c in COMPONENTS if c in available)
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text) if c.strip()]
    for name in names:
        if name not in COMPONENTS:
            raise InvalidArgumentError(f"unknown component {name!r}", accepted=", ".join(COMPONENTS),
                                       fix="e.g. --components unet,movq_decoder")
        if name not in available:
            raise InvalidArgumentError(f"component {name!r} is not exported in this artifact directory",
                                       accepted=", ".join(available) or "(none)",
                                       fix=f"k3trt export ... --components {name} --out ART")
    return tuple(dict.fromkeys(names))


def _opt_level(flags: BuildFlags, precision: Precision) -> int:
    if flags.builder_optimization_level is not None:
        level = flags.builder_optimization_level
        if not 0 <= level <= 5:
            raise InvalidArgumentError(f"--builder-optimization-level {level}", accepted="0..5 (TensorRT 10)",
                                       fix="use 3 (default) or 4-5 for longer builds that may run faster")
        return level
    return QUANTIZED_OPT_LEVEL if precision in QUANTIZED else DEFAULT_OPT_LEVEL


def _pending(manifest: Manifest, cp: ComponentPrecision) -> bool:
    from k3trt.export.precision_variants import is_current

    return cp.converted and not is_current(manifest, cp.component, cp.variant)


def plan_component(manifest: Manifest, cp: ComponentPrecision, request: ProfileRequest,
                   flags: BuildFlags) -> ComponentPlan:
    """One engine's plan. A converted variant not made yet is planned from its fp32 source (same I/O and
    axes) and marked pending; anything else missing or stale is a typed error from `resolve_precision`."""
    if _pending(manifest, cp):
        record, fp32 = manifest.onnx(cp.component), ()
        path = sha = None
    else:
        resolve_precision(manifest.data["onnx"], cp.component, cp.precision, baseline="default",
                          artifacts=str(manifest.root))
        record = manifest.onnx(cp.component, cp.variant)
        fp32, path, sha = tuple(record.extra.get("fp32_nodes", ())), record.graph.path, record.graph.sha256
    profile = derive_profile(record, request)
    level = _opt_level(flags, cp.precision)
    key = sha256_json({"format": PLAN_FORMAT, "onnx": sha or f"fp32:{record.graph.sha256}",
                       "precision": cp.to_dict(), "profile": profile.to_dict(), "level": level,
                       "refittable": flags.refittable, "workspace_gb": flags.workspace_gb})
    return ComponentPlan(cp.component, cp, path, sha, profile, fp32, level, key)


def create_pending_variants(manifest: Manifest, plan: BuildPlan, log) -> int:
    """Make every converted variant `plan` needs (export/variants.py: convert, verify, commit); reload."""
    from k3trt.export.precision_variants import add_variants

    made = []
    for cp in (c for c in plan.components if c.pending):
        made += add_variants(manifest.root, [cp.component], [cp.precision.variant], log=log)
    if made:
        manifest.data = Manifest.load(manifest.root).data
    return len(made)


def make_plan(manifest: Manifest, *, precision: str | None = None, component_precision: str | Mapping | None = None,
              components: str | Iterable[str] | None = None, resolutions: Iterable[str] | None = None,
              batch: str | int = 1, static: bool = False, guidance: bool = True,
              flags: BuildFlags = BuildFlags(), create_variants: bool = False, log=print) -> BuildPlan:
    """Validate the request against the manifest and compute every engine's profile, precision and flags.

    `create_variants`: make missing converted (fp16/bf16) variants first, so no component plan is pending."""
    names = parse_components(components, manifest.components())
    overrides = (parse_component_precision(component_precision) if isinstance(component_precision, (str, type(None)))
                 else {k: Precision.parse(v) for k, v in component_precision.items()})
    unknown = set(overrides) - set(names)
    if unknown:
        raise InvalidArgumentError(f"--component-precision names {sorted(unknown)}, which this build skips",
                                   accepted=", ".join(names), fix="add them to --components or drop them")
    tokenizer = manifest.data.get("tokenizer") or {}
    request = make_request(resolutions, batch, static=static, guidance=guidance,
                           max_text_length=int(tokenizer.get("max_length", 128)))
    chosen = select_precisions(names, precision, overrides)
    plans = tuple(plan_component(manifest, chosen[c], request, flags) for c in names)
    build_precision = Precision.parse(precision).value if precision else "default"
    plan = BuildPlan(str(manifest.root), build_precision, request, flags, plans)
    if create_variants and create_pending_variants(manifest, plan, log):
        plan = dataclasses.replace(plan, components=tuple(plan_component(manifest, chosen[c], request, flags)
                                                          for c in names))
    return plan
