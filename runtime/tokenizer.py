"""Prompt tokenization from the artifact's `tokenizer.json` with the `tokenizers` library (no transformers)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from k3trt.contract.errors import ArtifactError

log = logging.getLogger("k3trt")


class PromptTokenizer:
    """Pads/truncates to `max_length` exactly like `T5Tokenizer(padding="max_length", truncation=True)`."""

    def __init__(self, path: str | Path, *, max_length: int = 128, pad_id: int = 0):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(path))
        pad_token = self._tok.id_to_token(pad_id)
        if pad_token is None:

            raise ArtifactError(f"the tokenizer's pad id {pad_id} is not in its vocabulary ({path})",
                                fix="re-run `k3trt export`; never edit the manifest by hand")
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), int32 of shape (len(prompts), max_length)."""
        encodings = self._tok.encode_batch(prompts)
        for prompt, enc in zip(prompts, encodings):
            if enc.overflowing:
                log.warning("prompt truncated to %d tokens (Kandinsky 3 reads at most %d): %.60r...",
                            self.max_length, self.max_length, prompt)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int32)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int32)
        return ids, mask
