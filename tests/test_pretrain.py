"""scripts/pretrain_base.py (issue 5, part 1): a tiny pretraining run end to end, from the vendored text.

The runs here are a few dozen steps of a 2-block model on a slice of the text, so they take seconds; the
real run (12 blocks, ~11M parameters, ~12 minutes a family) is the script's default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from splitft.shared.model.tokenizer import load_tokenizer
from splitft.tools import pretrain as pb

ROOT = Path(__file__).resolve().parent.parent


def tiny(family: str, **overrides: object) -> pb.Settings:
    settings = {
        "family": family,
        "vocab_size": 320,
        "layers": 2,
        "hidden": 32,
        "heads": 2,
        "kv_heads": 1,
        "intermediate": 64,
        "seq_len": 32,
        "batch_size": 4,
        "steps": 20,
        "warmup_steps": 2,
        "lr": 3e-3,
        "corpus_chars": 40_000,
        "eval_every": 10,
        "eval_tokens": 256,
        "final_eval_tokens": 512,
    }
    settings.update(overrides)
    return pb.Settings(**settings)  # type: ignore[arg-type]


def test_the_text_is_vendored_with_its_licenses() -> None:
    for path in pb.DATA_FILES:
        assert path.is_file(), path
        assert (path.parent / "LICENSE").is_file(), f"no license beside {path}"
        assert path.parent.parent.name == "datasets" and path.parent.parent.parent.name == "shared"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"datasets/*/*"' in pyproject  # package-data: a wheel carries every file of every dataset folder
    sources = (pb.DATASETS / "SOURCES.md").read_text()
    assert "wikitext-2/" in sources and "e2e/" in sources
    train, valid = pb.corpus(pb.Settings())
    assert len(train) > 4000 and len(valid) > 50  # WikiText-2 test articles + E2E references; WikiText-2 valid


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pretrain_saves_a_loadable_deterministic_cached_base(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path / "cache"))
    settings = tiny(family)
    logged: list[str] = []
    steps: list[tuple[int, int | None]] = []
    out = pb.build_base(settings, log=logged.append, progress=lambda step, total: steps.append((step, total)))
    assert steps == [(i, 20) for i in range(1, 21)]  # the progress bar's feed: every step, of the planned 20
    assert out == tmp_path / "cache" / "base" / f"{family}-{pb.settings_hash(settings)[:12]}"
    assert any("tokens/s" in line for line in logged) and any("perplexity" in line for line in logged)
    assert not list(out.parent.glob(".*")), "the temp folder was left behind"

    # A normal Hugging Face folder: safetensors weights, a config without dropout, the trained tokenizer.
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == family and model.config.num_hidden_layers == 2
    assert all(getattr(model.config, k, 0.0) == 0.0 for k in ("resid_pdrop", "attn_pdrop", "attention_dropout"))
    tokenizer = load_tokenizer(out)
    assert len(tokenizer) == settings.vocab_size == model.config.vocab_size
    assert tokenizer.eos_token == pb.EOS and tokenizer.pad_token == pb.PAD
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (model.config.eos_token_id, model.config.pad_token_id)
    text = "The restaurant is in the city centre ."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    facts = json.loads((out / pb.FACTS_FILE).read_text())
    assert facts["steps"] == 20 and facts["tokens"] == 20 * 4 * 32
    assert facts["final_train_loss"] < facts["first_train_loss"] - 0.5, "the loss did not fall"
    assert facts["valid_ppl"] < settings.vocab_size  # better than uniform over the vocabulary
    assert facts["seed"] == 0 and facts["torch_version"] == torch.__version__ and facts["parameters"] > 0
    assert len(facts["valid_history"]) == 1  # at step 10 (the final validation is not repeated)

    # Deterministic: the same settings give the same weights, bit for bit.
    again = tmp_path / "again"
    pb.pretrain(settings, again, log=lambda _: None)
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()

    # The cache: the same settings return the folder without training; other settings get another folder.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(pb.train, "pretrain", no_training)  # where build_base looks it up
    logged.clear()
    assert pb.build_base(settings, log=logged.append) == out
    assert logged == [f"cached: {out}"]
    assert pb.default_output(tiny(family, seed=1)) != out
    with pytest.raises(FileExistsError):  # an explicit folder holding something else is not overwritten
        pb.build_base(tiny(family, seed=1), out, log=logged.append)


def test_minutes_sizes_the_run_and_records_its_steps(tmp_path: Path) -> None:
    settings = tiny("gpt2", steps=0, minutes=0.01, eval_every=0)
    facts = pb.pretrain(settings, tmp_path / "timed", log=lambda _: None)
    assert facts["steps"] >= min(10, settings.warmup_steps) + 1
    assert facts["settings"]["minutes"] == 0.01 and facts["settings"]["steps"] is None


def test_the_budget_and_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # The default: 12 blocks, a token budget of about 12 minutes per family.
    default = pb.Settings(family="llama", precision="bf16")
    assert default.layers == 12 and default.planned_steps() == pb.DEFAULT_TOKENS["llama", "bf16"] // (8 * 256)
    assert pb.Settings(steps=7).planned_steps() == 7 and pb.Settings(minutes=3).planned_steps() is None
    monkeypatch.setenv("SPLITFT_CACHE", str(tmp_path))
    assert pb.main(["--family", "llama", "--precision", "fp32", "--print-path"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == pb.default_output(pb.Settings(family="llama", precision="fp32"))
    assert printed.parent == tmp_path / "base" and not printed.exists()
    # --demo: the main job's small base; its settings are the defaults, and the other options still apply.
    demo, _ = pb.parse_args(["--demo", "--precision", "fp32"])
    assert demo == dataclasses.replace(pb.DEMO, precision="fp32") and (demo.layers, demo.hidden) == (6, 128)
    assert pb.parse_args(["--demo", "--precision", "fp32", "--layers", "4"])[0].layers == 4
    assert pb.default_output(demo) != pb.default_output(pb.Settings(precision="fp32"))
