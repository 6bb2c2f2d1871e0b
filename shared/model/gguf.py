"""GGUF files as model sources: converted once into a Hugging Face folder that every part of SplitFT reads.

GGUF is the single-file format edge devices already keep for llama.cpp. transformers reads it (through the
``gguf`` package) and dequantizes its tensors, but refuses to save a model so loaded. :func:`convert` loads a
GGUF file with transformers' own loader, forgets that it came quantized, and writes an ordinary folder:
``model.safetensors``, ``config.json``, the tokenizer with its chat template.

A device given the GGUF file itself (``--model model.gguf``) converts it into a cache folder named by the
file's content (:func:`cached_folder`), so two devices with the same file compute the same folder, and so the
same model fingerprint, wherever they keep the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitft.shared.errors import ModelError
from splitft.shared.model.precision import DTYPES

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
#: where converted GGUF files are kept (``$SPLITFT_CACHE/models``; default ``~/.cache/splitft/models``)
CACHE_ENV = "SPLITFT_CACHE"

# (resolved path, size, mtime_ns) -> sha256: a file is hashed once per process while it is unchanged
_hashes: dict[tuple[str, int, int], str] = {}


def is_gguf(source: str | Path) -> bool:
    return str(source).lower().endswith(SUFFIX)


def cache_root() -> Path:
    """The folder SplitFT caches what it makes from its inputs in (converted models, the pretrained base)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "splitft")


def content_hash(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _hashes:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            _hashes[key] = digest.hexdigest()
    except OSError as exc:
        raise ModelError(f"cannot read the GGUF file {path}: {exc.strerror or exc}") from exc
    return _hashes[key]


def architecture(path: Path) -> str:
    """The ``general.architecture`` a GGUF file declares (``llama``, ``qwen2``, ``gpt2``, ...)."""
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file: {exc}") from exc
    if field is None or not field.data:
        raise ModelError(f"{path}: the GGUF file declares no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def check_architecture(path: Path, supported: Collection[str]) -> str:
    """The file's architecture, or a :class:`ModelError` naming it when SplitFT does not split it."""
    arch = architecture(path)
    if arch not in supported:
        raise ModelError(
            f"{path}: a GGUF model of architecture {arch!r}; SplitFT splits {', '.join(sorted(supported))} models"
        )
    return arch


def convert(path: Path, out: Path, supported: Collection[str], dtype: str = "fp32") -> None:
    """Write the model of a GGUF file as a Hugging Face folder ``out`` (which must not hold a model yet):
    weights dequantized to ``dtype`` (fp32, bf16, fp16), config, tokenizer and chat template."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_architecture(path, supported)
    try:  # transformers shows its own progress bar while it dequantizes
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=DTYPES[dtype], local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"transformers cannot load the GGUF file {path}: {exc}") from exc
    _forget_quantization(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _forget_quantization(model: Any) -> None:
    """The weights are already dequantized in memory; transformers only refuses to save a model that came from a
    quantized file. Dropping that record makes it an ordinary model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def cached_folder(path: Path, supported: Collection[str]) -> Path:
    """The folder converted from GGUF file ``path`` (fp32), made on first use in the cache, keyed by the file's
    content. Several processes may ask at once: each converts into a folder of its own, the first to finish
    renames its folder into place, the others discard theirs."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    folder = cache_root() / "models" / f"gguf-{content_hash(path)[:20]}-fp32"
    if (folder / "config.json").is_file():
        return folder
    log.info("converting %s into %s (once; later runs find it there)", path, folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise ModelError(f"cannot write the model cache {folder.parent}: {exc.strerror or exc}") from exc
    try:
        convert(path, work, supported)
        try:
            work.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another process's complete copy: a real failure
                raise
    except OSError as exc:
        raise ModelError(f"cannot write the model cache {folder}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder
