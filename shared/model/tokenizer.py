"""Tokenizers and the vendored text: everything loads from local files, nothing from a hub."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from splitft.shared.errors import ModelError
from splitft.shared.model.loading import PRESETS, resolve_source

DATASETS = Path(__file__).resolve().parent.parent / "datasets"  # shared/datasets
GPT2_TOKENIZER = DATASETS / "gpt2-tokenizer" / "tokenizer.json"
GSM8K = DATASETS / "gsm8k"


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or GGUF file, or the vendored GPT-2 tokenizer for a preset.

    A pad token is always set (the end-of-text token when the tokenizer has none); batches are
    right-padded.
    """
    if str(source) in PRESETS:
        tokenizer: PreTrainedTokenizerBase = PreTrainedTokenizerFast(
            tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_source(source), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"no usable tokenizer in {source}: {exc}") from exc
    if tokenizer.eos_token is None:
        raise ModelError(
            f"the tokenizer in {source} has no EOS token; SplitFT ends every training response with it: set "
            '"eos_token" in its tokenizer_config.json (e.g. "<|endoftext|>" or "</s>", a token of its vocabulary)'
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
