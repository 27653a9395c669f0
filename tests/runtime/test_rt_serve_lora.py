"""LoRA adapters in `k3trt serve` (issue 21): two PEFT adapters served by one server process, chosen per request
through the OpenAI `model` field with the official SDK, interleaved, against `Pipeline` with the same adapter."""
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import running, wait_ready

openai = pytest.importorskip("openai", reason="the OpenAI SDK tests need `openai` (in `dev`)")
pytest.importorskip("fastapi", reason="the HTTP service needs the `serve` extra (in `dev`)")
pytest.importorskip("peft", reason="training the test adapters needs `peft` (in `dev`)")

from PIL import Image  # noqa: E402

from k3trt.contract.errors import AdapterError, InvalidArgumentError  # noqa: E402
from k3trt.contract.tensor_metrics import psnr  # noqa: E402
from k3trt.runtime import Pipeline  # noqa: E402
from k3trt.runtime.serving.adapters import parse_served_lora  # noqa: E402
from k3trt.runtime.serving.http import ImageService, ServeSettings  # noqa: E402

PSNR_MIN_DB = 40.0  # issue 21: a served adapter's image vs Pipeline with that adapter and seed
DISTINCT_MAX_DB = 30.0  # the adapters must change the image this much for the no-cross-talk check to mean anything
PROMPT, STEPS, SEED = "a red fox in a snowy forest", 3, 5
INK_SCALE = 0.8


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from k3trt.verify.lora_training import train_peft_lora

    root = tmp_path_factory.mktemp("served-loras")
    train_peft_lora(tiny_model_dir, root / "fox", seed=0)
    train_peft_lora(tiny_model_dir, root / "ink", seed=1)
    return {"fox": str(root / "fox"), "ink": f"{root / 'ink'}:{INK_SCALE}"}


@pytest.fixture(scope="module")
def references(tiny_artifacts, adapters):
    """model id -> (Pipeline image with that adapter, bytes of its overridden weights)."""
    out = {}
    for model, lora in (("kandinsky-3", None), ("kandinsky-3+fox", adapters["fox"]),
                        ("kandinsky-3+ink", adapters["ink"])):
        pipe = Pipeline.from_artifacts(tiny_artifacts, "ort")
        weight_bytes = pipe.set_lora(lora)
        [image] = pipe.generate(PROMPT, seed=SEED, steps=STEPS, height=64, width=64)
        out[model] = (np.asarray(image, np.float32) / 255, weight_bytes)
    return out


def _settings(tiny_artifacts, adapters, cache: int) -> ServeSettings:
    return ServeSettings(str(tiny_artifacts), default_size="64x64", default_steps=STEPS, max_batch=4, max_queue=16,
                         loras=tuple(adapters.items()), lora_cache=cache)


@pytest.fixture(scope="module")
def server(tiny_artifacts, adapters):
    with running(ImageService(_settings(tiny_artifacts, adapters, cache=2))) as url:
        wait_ready(url)
        yield url


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _generate(client, model: str) -> np.ndarray:
    answer = client.images.generate(prompt=PROMPT, model=model, size="64x64", extra_body={"seed": SEED})
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))), np.float32) / 255


def test_interleaved_requests_get_their_own_adapters_image_with_no_cross_talk(server, references):
    models = ["kandinsky-3+fox", "kandinsky-3", "kandinsky-3+ink"] * 3
    with ThreadPoolExecutor(len(models)) as pool:  # in flight together: the engines run them side by side
        images = list(pool.map(lambda m: _generate(_client(server), m), models))
    for a in references:
        for b in references:
            if a < b:
                assert psnr(references[a][0], references[b][0]) < DISTINCT_MAX_DB, (a, b)
    for model, image in zip(models, images):
        scores = {ref: psnr(references[ref][0], image) for ref in references}
        assert scores[model] >= PSNR_MIN_DB, (model, scores)
        assert all(score < DISTINCT_MAX_DB for ref, score in scores.items() if ref != model), (model, scores)
    base_after = _generate(_client(server), "kandinsky-3")  # the base model is unaffected, bit for bit
    np.testing.assert_array_equal(base_after, references["kandinsky-3"][0])


def test_models_list_and_unknown_model_is_a_400_listing_the_accepted_ids(server):
    client = _client(server)
    assert [m.id for m in client.models.list()] == ["kandinsky-3", "kandinsky-3+fox", "kandinsky-3+ink"]
    assert client.models.retrieve("kandinsky-3+ink").id == "kandinsky-3+ink"
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt=PROMPT, model="kandinsky-3+nope", size="64x64")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert "kandinsky-3+fox" in raised.value.message and "kandinsky-3+ink" in raised.value.message


def test_cache_of_one_evicts_the_idle_adapter_and_metrics_show_its_weight_bytes(tiny_artifacts, adapters,
                                                                                 references):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def gauge(url: str, name: str) -> float:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        return next(f.samples[0].value for f in families if f.name == name)

    service = ImageService(_settings(tiny_artifacts, adapters, cache=1))
    with running(service) as url:
        wait_ready(url)
        client = _client(url)
        for model in ("kandinsky-3+fox", "kandinsky-3+ink", "kandinsky-3+fox"):
            assert psnr(references[model][0], _generate(client, model)) >= PSNR_MIN_DB, model
            assert service.adapters.cached == [model.split("+")[1]]  # the bound holds: one state at a time
            assert gauge(url, "k3trt_lora_cache_bytes") == references[model][1] > 0
            assert gauge(url, "k3trt_lora_cache_states") == 1


def test_a_bad_adapter_is_a_typed_error_before_the_server_listens(tiny_artifacts, tmp_path):
    from k3trt.verify.lora_training import train_peft_lora  # noqa: F401  (same extra as the adapters)

    with pytest.raises((AdapterError, InvalidArgumentError), match="missing"):
        ImageService(ServeSettings(str(tiny_artifacts), loras=(("missing", str(tmp_path / "missing")),)))
    for bad in ("no-equals-sign", "=path", "bad name=path"):
        with pytest.raises(InvalidArgumentError, match="NAME=PATH"):
            parse_served_lora(bad)
    with pytest.raises(InvalidArgumentError, match="lora-cache"):
        ImageService(ServeSettings(str(tiny_artifacts), lora_cache=0))
