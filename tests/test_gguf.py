"""GGUF files as model sources: `import` into a folder, or `--model file.gguf` through the content-keyed cache.

The files are written here with the ``gguf`` package's writer (tests/gguf_files.py), all F32, so an import
must give back the very weights written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from splitft.coordinator.cli import app
from splitft.shared.errors import ExitCode, ModelError
from splitft.shared.model.equivalence import compare_split_to_whole
from splitft.shared.model.loading import load_config, model_fingerprint, resolve_source
from splitft.shared.model.tokenizer import load_tokenizer

from gguf_files import CHAT_TEMPLATE, write_llama_gguf, write_unsupported_gguf

runner = CliRunner()


def fingerprint_of(output: str) -> str:
    match = re.search(r"fingerprint ([0-9a-f]{16})", output)
    assert match, output
    return match.group(1)


def test_gguf_imports_are_exact_and_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two imports of one file, and a device given the file itself, hold the same model: the weights written,
    the tokenizer with its chat template, one fingerprint."""
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "files" / "tiny.gguf"
    written = write_llama_gguf(source)
    prints = []
    for name in ("a", "b"):
        result = runner.invoke(app, ["import", str(source), "--out", str(tmp_path / name)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "llama, 4 blocks, hidden 128, vocab 50257, fp32, chat template yes" in result.output
        prints.append(fingerprint_of(result.output))
    folder = tmp_path / "a"
    assert prints[0] == prints[1] == model_fingerprint(folder) == model_fingerprint(tmp_path / "b")

    weights = load_file(folder / "model.safetensors")
    expected = written.state_dict()
    assert set(weights) == {k for k in expected if k != "lm_head.weight"}  # tied to the embedding: saved once
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name]), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = "Natalia sold clips to 48 of her friends."
    assert tokenizer(text)["input_ids"] == load_tokenizer("tiny-llama")(text)["input_ids"]

    # Given the file itself, a device converts it once into the cache, keyed by the file's content.
    assert model_fingerprint(source) == prints[0]
    cached = Path(resolve_source(source))
    assert cached.parent == tmp_path / "cache" / "models" and cached.name.startswith("gguf-")
    moved = tmp_path / "elsewhere" / "renamed.gguf"  # another path, the same bytes: the same folder
    moved.parent.mkdir()
    moved.write_bytes(source.read_bytes())
    assert resolve_source(moved) == str(cached)
    # ... and it splits exactly, straight from the file.
    report = compare_split_to_whole(str(source), 2)
    assert report.within(1e-5), report


def test_gguf_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "rwkv.gguf"
    write_unsupported_gguf(other, "rwkv7")
    result = runner.invoke(app, ["import", str(other), "--out", str(tmp_path / "out")])
    assert result.exit_code == ExitCode.MODEL, result.output
    assert "a GGUF model of architecture 'rwkv7'; SplitFT splits gpt2, llama, mistral, qwen2 models" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelError, match="architecture 'rwkv7'"):
        load_config(other)
    assert not list((tmp_path / "cache" / "models").glob("*"))  # nothing half-converted is kept
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a GGUF file")
    with pytest.raises(ModelError, match=r"fake\.gguf is not a readable GGUF file"):
        load_config(fake)
    with pytest.raises(ModelError, match=r"missing\.gguf does not exist"):
        model_fingerprint(tmp_path / "missing.gguf")


def test_import_a_preset_in_another_dtype(tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", "tiny-gpt2", "--out", str(tmp_path / "m"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.bfloat16}
    result = runner.invoke(app, ["import", "tiny-gpt2", "--out", str(tmp_path / "m")])
    assert result.exit_code == ExitCode.CONFIG and "is not empty" in result.output
    result = runner.invoke(app, ["import", "tiny-gpt2", "--out", str(tmp_path / "n"), "--dtype", "int4"])
    assert result.exit_code == ExitCode.CONFIG and "--dtype must be one of" in result.output
