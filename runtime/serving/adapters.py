"""LoRA adapters in the server: registered at start, chosen per request by the OpenAI `model` field.

`k3trt serve --lora NAME=PATH[:SCALE]` registers an adapter under the model id `kandinsky-3+NAME` ("kandinsky-3"
is the base). Every adapter is read and mapped onto the artifacts' weights when the service is made, so a bad
one is a typed error before the server listens. A backend holds one weight state (ONNX Runtime builds its
sessions with the overridden initializers), so each adapter runs on a pipeline and batching engine of its own:
requests for different adapters are never in one U-Net call, and no request sees another's weights. Those
pipelines live in a bounded LRU cache (`--lora-cache N`), built on first use; an idle one is evicted to make
room, and when every cached one is busy a request for another adapter is refused with 429 + Retry-After (the
bound holds). The bytes of the overridden weights held are exported as `k3trt_lora_cache_bytes`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading

from k3trt.contract.errors import InvalidArgumentError
from k3trt.runtime.serving.engine import QueueFullError
from k3trt.runtime.serving.schema import FieldError

log = logging.getLogger("k3trt")
BASE_MODEL = "kandinsky-3"
SEPARATOR = "+"
MAX_LORA_CACHE = 64  # pipelines held at once; each holds its own sessions
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def parse_served_lora(text: str) -> tuple[str, str]:
    """`NAME=PATH[:SCALE]` -> (NAME, "PATH[:SCALE]"); NAME: letters, digits, `-_.` (it becomes a model id)."""
    name, sep, spec = text.partition("=") if isinstance(text, str) else ("", "", "")
    if not sep or not name or not spec or not set(name) <= NAME_CHARS or len(name) > 64:
        raise InvalidArgumentError(f"--lora {text!r}", accepted="NAME=PATH[:SCALE], NAME of letters, digits, "
                                   "'-', '_', '.' (at most 64)", fix="e.g. --lora watercolor=loras/watercolor:0.8")
    return name, spec


def model_id(name: str | None) -> str:
    return BASE_MODEL if name is None else f"{BASE_MODEL}{SEPARATOR}{name}"


def register_adapters(manifest, loras) -> dict[str, tuple]:
    """name -> its LoraChoice tuple, each read and mapped onto `manifest`'s weights now (typed errors)."""
    from k3trt.runtime.lora import blended_deltas, load_loras

    registered: dict[str, tuple] = {}
    for name, spec in loras:
        if name in registered:
            raise InvalidArgumentError(f"--lora {name}={spec}: the name {name!r} is registered twice",
                                       accepted="one --lora per NAME", fix="give each adapter its own NAME")
        choices = load_loras(spec)
        blended_deltas(manifest, choices)  # every layer maps, or an AdapterError naming the unmapped ones
        registered[name] = choices
    return registered


@dataclasses.dataclass
class _Cached:
    engine: object
    weight_bytes: int


class AdapterStates:
    """The registered adapters and the bounded LRU cache of their pipelines + engines."""

    def __init__(self, adapters: dict[str, tuple], capacity: int, build, metrics=None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_LORA_CACHE:
            raise InvalidArgumentError(f"--lora-cache {capacity!r}", accepted=f"1..{MAX_LORA_CACHE}",
                                       fix="e.g. --lora-cache 2")
        self.adapters, self.capacity, self._build, self._metrics = adapters, capacity, build, metrics
        self._cache: collections.OrderedDict[str, _Cached] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def model_ids(self) -> list[str]:
        return [BASE_MODEL] + [model_id(name) for name in self.adapters]

    def resolve(self, model) -> str | None:
        """The adapter a request's `model` names (None: the base), or a 400 listing the accepted ids."""
        if model is None or model == BASE_MODEL:
            return None
        if isinstance(model, str) and model.startswith(BASE_MODEL + SEPARATOR) \
                and model[len(BASE_MODEL) + 1:] in self.adapters:
            return model[len(BASE_MODEL) + 1:]
        shown = repr(model)[:80]
        raise FieldError("model", f"model {shown} is not served here", accepted=", ".join(self.model_ids),
                         fix="GET /v1/models lists them; adapters are registered with `k3trt serve --lora "
                             "NAME=PATH`", code="model_not_found")

    def submit(self, name: str, submit):
        """`submit(engine)` on the adapter's engine (built on first use), under the lock that evicts."""
        with self._lock:
            cached = self._cache.get(name)
            if cached is None:
                self._make_room(name)
                engine, weight_bytes = self._build(self.adapters[name])
                cached = self._cache[name] = _Cached(engine, weight_bytes)
                log.warning("k3trt serve: adapter %s loaded (%d bytes of weights)", name, weight_bytes)
                self._report()
            self._cache.move_to_end(name)
            return submit(cached.engine)

    def _make_room(self, wanted: str) -> None:
        while len(self._cache) >= self.capacity:
            idle = [n for n, c in self._cache.items() if c.engine.pending == 0]
            if not idle:
                raise QueueFullError(f"every cached adapter state ({self.capacity}) is busy; {wanted!r} cannot be "
                                     "loaded now", fix="retry after Retry-After seconds, or start the server with "
                                     "a larger --lora-cache")
            evicted = self._cache.pop(idle[0])  # the least recently used idle one
            evicted.engine.stop(0.0)
            log.warning("k3trt serve: adapter %s evicted from the cache", idle[0])

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.lora_cache_bytes.set(sum(c.weight_bytes for c in self._cache.values()))
            self._metrics.lora_cache_states.set(len(self._cache))

    @property
    def cached(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def stop(self, grace_s: float) -> None:
        with self._lock:
            for cached in self._cache.values():
                cached.engine.stop(grace_s)
