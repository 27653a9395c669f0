"""Dynamic shapes: the exported graphs run at shapes other than the trace's and match the torch components.

The inputs are built here, not by `ComponentSpec.make_inputs`, so a bug in the sample-input generators cannot
hide a bug in the graphs. The shapes the issue names (batch 3, latent 24x40, L = 77) coincide with the second
`validate` case of each spec, so every component also runs at a shape that no spec uses at all and at the
smallest values its manifest axis ranges allow.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from k3trt.export.components import SPECS
from k3trt.contract.manifest import Manifest
from k3trt.runtime.backends.base import check_feeds
from k3trt.contract.tensor_metrics import compare

BOUND = 1e-4


@pytest.fixture(scope="module")
def manifest(tiny_artifacts) -> Manifest:
    return Manifest.load(tiny_artifacts)


@pytest.fixture(scope="module")
def runners(tiny_source, manifest):
    """component -> (torch wrapper in eval mode, ONNX Runtime CPU session, manifest record)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    out = {}
    for name, spec in SPECS.items():
        wrapper = spec.wrapper(tiny_source.load(spec.folder)).eval()
        path = manifest.path(manifest.onnx(name).graph.path)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out[name] = (wrapper, session, manifest.onnx(name))
    return out


def run_both(runners, name, feeds: dict):
    wrapper, session, record = runners[name]
    spec = SPECS[name]
    check_feeds(record, feeds)  # a request the runtime accepts: inside the manifest's axis ranges
    with torch.no_grad():
        expected = wrapper(*(feeds[n] for n in spec.input_names)).numpy()
    (got,) = session.run(spec.output_names, {k: v.numpy() for k, v in feeds.items()})
    return expected, got


def text_feeds(batch: int, seq: int, lengths: list[int], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (batch, seq), generator=gen, dtype=torch.int32)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int32)
    return {"input_ids": ids * mask, "attention_mask": mask}


def unet_feeds(batch: int, h: int, w: int, ctx: int, lengths: list[int], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(ctx)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float32)
    return {
        "sample": torch.randn(batch, 4, h, w, generator=gen),
        "timestep": torch.linspace(999, 1, batch).round(),
        "encoder_hidden_states": torch.randn(batch, ctx, 64, generator=gen) * mask[..., None],
        "encoder_attention_mask": mask,
    }


def assert_close(expected, got, shape):
    assert got.shape == shape, got.shape
    assert np.isfinite(got).all()
    metrics = compare(expected, got)
    assert metrics.finite and metrics.within(rel_l2=BOUND), str(metrics)


@pytest.mark.parametrize("batch, seq, lengths", [
    (3, 77, [77, 40, 1]),
    (4, 5, [5, 5, 3, 2]),  # a shape no spec uses
    (1, 1, [1]),  # the smallest sequence the manifest allows
])
def test_text_encoder_dynamic(runners, batch, seq, lengths):
    expected, got = run_both(runners, "text_encoder", text_feeds(batch, seq, lengths, seed=11))
    assert_close(expected, got, (batch, seq, 64))


@pytest.mark.parametrize("batch, h, w, ctx, lengths", [
    (3, 24, 40, 77, [0, 77, 30]),  # row 0 fully masked: the unconditional branch
    (2, 16, 16, 128, [0, 100]),  # the longest context, again with a fully-masked row
    (4, 32, 16, 50, [50, 0, 7, 1]),  # a shape no spec uses
    (1, 8, 8, 1, [0]),  # the smallest latent and context the manifest allows, unconditional
])
def test_unet_dynamic(runners, batch, h, w, ctx, lengths):
    feeds = unet_feeds(batch, h, w, ctx, lengths, seed=12)
    assert not feeds["encoder_attention_mask"][lengths.index(0)].any()
    expected, got = run_both(runners, "unet", feeds)
    assert np.isfinite(got[lengths.index(0)]).all()  # the -10000 bias keeps the masked row finite
    assert_close(expected, got, (batch, 4, h, w))


def test_unet_timestep_is_a_live_input(runners):
    """The graph's output depends on the timestep (not folded into a constant at trace time)."""
    _, session, _ = runners["unet"]
    feeds = {k: v.numpy() for k, v in unet_feeds(2, 16, 24, 9, [9, 4], seed=13).items()}
    (a,) = session.run(None, feeds)
    (b,) = session.run(None, {**feeds, "timestep": np.array([5.0, 900.0], np.float32)})
    assert compare(a, b).rel_l2 > 1e-3


@pytest.mark.parametrize("batch, h, w", [
    (3, 24, 40),
    (2, 12, 20),  # a shape no spec uses
    (1, 1, 1),  # the smallest latent the manifest allows
    (1, 3, 5),  # odd sizes: MoVQ has no multiple constraint
])
def test_movq_decoder_dynamic(runners, batch, h, w):
    latents = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(14))
    expected, got = run_both(runners, "movq_decoder", {"latents": latents})
    assert_close(expected, got, (batch, 3, 8 * h, 8 * w))
