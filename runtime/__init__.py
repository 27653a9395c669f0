"""k3trt.runtime: the lean runtime. Reads only an artifact directory; never imports model-definition code."""
from __future__ import annotations

__all__ = ["Pipeline"]


def __getattr__(name):  # lazy, so `import k3trt.contract.errors` stays light
    if name == "Pipeline":
        from k3trt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
