"""The TensorRT timing cache is replaced atomically after a good build and never touched by a failed one.

Polygraphy, given a cache *path*, rewrites it in place (a build killed mid-write leaves it truncated) and
leaves `<path>.lock` beside it. `build_engine_bytes` hands it an anonymous temporary file instead. TensorRT is
not installable here, so the builder is a stand-in that writes its cache with Polygraphy's own file helpers
(`util.load_file`/`util.save_file`, which fsync the file: a BytesIO would fail there)."""
from __future__ import annotations

import types

import pytest

pytest.importorskip("polygraphy", reason="Polygraphy is part of the [gpu] extra; the build path needs it")

import polygraphy.backend.trt as polygraphy_trt  # noqa: E402
from polygraphy import util  # noqa: E402
from polygraphy.exception import PolygraphyException  # noqa: E402

from k3trt.engines import build  # noqa: E402
from k3trt.contract.errors import ArtifactError  # noqa: E402


class FakeBuilder:
    """Stands in for EngineBytesFromNetwork: merges with what its cache file holds, then saves, as Polygraphy does."""

    fail = False

    def __init__(self, network, config=None, save_timing_cache=None):
        self.cache = save_timing_cache

    def __call__(self):  # the steps of EngineBytesFromNetwork.call_impl (Polygraphy 0.53.6) after the build
        if self.fail:
            raise PolygraphyException("out of memory during the build")
        with util.LockFile(self.cache):  # creates `<path>.lock` for a path, nothing for an open file
            try:
                previous = util.load_file(self.cache)
            except Exception:
                previous = b""
            util.save_file(previous + b"new-timings", self.cache)
        return b"engine-bytes"


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "trt_logger", lambda: None)
    monkeypatch.setattr(build, "_network", lambda path: "network")
    monkeypatch.setattr(build, "_config", lambda plan, flags, cache: "config")
    monkeypatch.setattr(polygraphy_trt, "EngineBytesFromNetwork", FakeBuilder)
    plan = types.SimpleNamespace(name="unet", onnx_path="unet/model.onnx")
    manifest = types.SimpleNamespace(path=lambda p: tmp_path / p)
    return plan, manifest


def test_a_good_build_replaces_the_cache_atomically_without_litter(stubbed, tmp_path):
    plan, manifest = stubbed
    cache = tmp_path / "caches" / "timing.cache"
    assert build.build_engine_bytes(plan, manifest, None, cache, {}) == b"engine-bytes"
    assert cache.read_bytes() == b"new-timings"
    assert sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]  # no .lock, no temp file


def test_a_failed_build_leaves_the_users_cache_as_it_was(stubbed, tmp_path, monkeypatch):
    plan, manifest = stubbed
    cache = tmp_path / "mine.cache"
    cache.write_bytes(b"the user's timings")
    monkeypatch.setattr(FakeBuilder, "fail", True)
    with pytest.raises(ArtifactError, match="timing cache were left untouched"):
        build.build_engine_bytes(plan, manifest, None, cache, {})
    assert cache.read_bytes() == b"the user's timings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.cache"]
