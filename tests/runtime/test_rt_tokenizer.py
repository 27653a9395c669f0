"""The runtime tokenizer (tokenizers library, artifact tokenizer.json) against transformers' tokenizer."""
import logging

from k3trt.contract.manifest import Manifest
from k3trt.runtime.tokenizer import PromptTokenizer

PROMPTS = ["a red fox in a snowy forest, watercolor", "Кот сидит на окне", "", "x " * 300]


def test_matches_transformers_tokenizer(tiny_model_dir, tiny_artifacts):
    from transformers import AutoTokenizer

    manifest = Manifest.load(tiny_artifacts)
    ours = PromptTokenizer(manifest.path(manifest.data["tokenizer"]["path"]))
    reference = AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    expected = reference(PROMPTS, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    ids, mask = ours(PROMPTS)
    assert ids.shape == (4, 128)
    assert ids.tolist() == expected.input_ids.tolist()
    assert mask.tolist() == expected.attention_mask.tolist()
    assert mask[2].sum() == 1  # the empty prompt is just </s>


def test_long_prompt_truncated_with_warning(tiny_artifacts, caplog):
    manifest = Manifest.load(tiny_artifacts)
    tok = PromptTokenizer(manifest.path(manifest.data["tokenizer"]["path"]))
    with caplog.at_level(logging.WARNING, logger="k3trt"):
        ids, mask = tok(["x " * 300])
    assert int(mask.sum()) == 128
    assert "truncated to 128 tokens" in caplog.text
