"""Nothing that can execute code while loading data (issue 6, item 11).

Unpickling runs code chosen by whoever wrote the bytes, and so do ``torch.load`` (pickle inside),
``numpy.load(allow_pickle=True)``, pandas' pickle readers, ``marshal``/``shelve``/``dill``/``joblib``,
and ``trust_remote_code=True`` (Python shipped with a model). SplitFT reads messages with msgpack
(no ext types) and weights and checkpoints with safetensors. This test parses the source with ``ast``
(a comment or a string that mentions pickle is fine; an aliased import or call is not) and checks the
two places where bytes from elsewhere are read: the wire codec and checkpoints.
"""

from __future__ import annotations

import ast
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard
from safetensors import safe_open

from splitft.coordinator.checkpoint import latest_checkpoint, save_checkpoint
from splitft.coordinator.server import ServerModel
from splitft.shared.errors import WireError
from splitft.shared.job.config import JobConfig
from splitft.shared.wire.codec import compress, unpack
from splitft.shared.wire.envelope import decode_envelope
from splitft.shared.wire.messages import Activations

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("agent", "coordinator", "shared", "scripts")

#: modules that (de)serialise arbitrary objects by running code
BANNED_MODULES = frozenset({"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"})
#: calls that unpickle (or pickle, for a reader to unpickle later), by their fully resolved name
BANNED_CALLS = frozenset(
    {
        "torch.load",
        "torch.jit.load",
        "torch.save",
        "pandas.read_pickle",
        "pandas.read_hdf",
        "eval",
        "exec",
        "builtins.eval",
        "builtins.exec",
    }
)
#: methods that unpickle whatever object they are called on (``df.to_pickle``, ``store.read_pickle``)
BANNED_METHODS = frozenset({"read_pickle", "to_pickle"})


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


class _Scanner(ast.NodeVisitor):
    """Resolves import aliases (``import torch as t``, ``from torch import load``) and flags banned uses."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.aliases: dict[str, str] = {}
        self.findings: list[Finding] = []

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.filename, getattr(node, "lineno", 0), what))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in BANNED_MODULES:
                self.flag(node, f"import {alias.name}")
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                root = alias.name.split(".")[0]
                self.aliases[root] = root
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] in BANNED_MODULES:
            self.flag(node, f"from {module} import ...")
        for alias in node.names:
            if alias.name in BANNED_MODULES:
                self.flag(node, f"from {module or '.'} import {alias.name}")
            if node.level == 0:
                self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        self.generic_visit(node)

    def qualified(self, node: ast.expr) -> str | None:
        """``np.load`` -> ``numpy.load`` after ``import numpy as np``; None for anything but a dotted name."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualified(node.func)
        if name in BANNED_CALLS:
            self.flag(node, f"call of {name}")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in BANNED_METHODS:
            self.flag(node, f"call of .{node.func.attr}()")
        if name in ("__import__", "importlib.import_module") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and str(first.value).split(".")[0] in BANNED_MODULES:
                self.flag(node, f"dynamic import of {first.value}")
        for keyword in node.keywords:
            value = keyword.value
            literal = value.value if isinstance(value, ast.Constant) else ...  # ...: not a literal
            if keyword.arg == "allow_pickle" and literal is not False:
                self.flag(node, f"{name or 'a call'} with allow_pickle={ast.unparse(value)}")
            if keyword.arg == "trust_remote_code" and literal is not False:
                self.flag(node, f"{name or 'a call'} with trust_remote_code={ast.unparse(value)}")
            if keyword.arg in ("use_safetensors", "safe_serialization") and literal is not True:
                self.flag(node, f"{name or 'a call'} with {keyword.arg}={ast.unparse(value)}")
            if keyword.arg == "weights_only" and literal is not True:
                self.flag(node, f"{name or 'a call'} with weights_only={ast.unparse(value)}")
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<string>") -> list[Finding]:
    """Every banned import and call in one Python source."""
    scanner = _Scanner(filename)
    scanner.visit(ast.parse(source, filename=filename))
    return scanner.findings


def sources() -> list[Path]:
    files = sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 30, files  # the scan would pass vacuously if the folders moved
    return files


def test_no_pickle_or_code_execution_in_the_source() -> None:
    findings = [f for path in sources() for f in scan_source(path.read_text(), str(path.relative_to(ROOT)))]
    assert not findings, "\n".join(map(str, findings))


def test_shell_scripts_do_not_load_pickles_either() -> None:
    """scripts/*.sh cannot be parsed by ast; a plain search there (they run python -c at most)."""
    for path in sorted((ROOT / "scripts").rglob("*.sh")):
        text = path.read_text()
        for word in ("pickle", "torch.load", "trust_remote_code", "allow_pickle"):
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word}"


def test_the_scanner_finds_what_it_must() -> None:
    source = """
import pickle
import numpy as np
import pandas as pd
import torch as t
import dill.settings
from joblib import load as jload
from torch import load as tload
from torch import jit
from . import marshal
import shelve, cPickle

t.load(x)
torch.load(x)
tload(x)
jit.load(x)
np.load(f, allow_pickle=True)
np.load(f, allow_pickle=flag)
pd.read_pickle(f)
frame.to_pickle(f)
eval("1 + 1")
exec(code)
__import__("pickle")
AutoModel.from_pretrained(path, trust_remote_code=True)
AutoModel.from_pretrained(path, use_safetensors=False)
model.save_pretrained(path, safe_serialization=False)
"""
    found = [f.what for f in scan_source(source)]
    expected = [
        "import pickle",
        "import dill.settings",
        "from joblib import ...",
        "from . import marshal",
        "import shelve",
        "import cPickle",
        "call of torch.load",
        "call of torch.load",
        "call of torch.load",
        "call of torch.jit.load",
        "numpy.load with allow_pickle=True",
        "numpy.load with allow_pickle=flag",
        "call of pandas.read_pickle",
        "call of .to_pickle()",
        "call of eval",
        "call of exec",
        "dynamic import of pickle",
        "AutoModel.from_pretrained with trust_remote_code=True",
        "AutoModel.from_pretrained with use_safetensors=False",
        "model.save_pretrained with safe_serialization=False",
    ]
    assert sorted(found) == sorted(expected)
    # What is fine: a method called eval, numpy's safe default, literal opt-outs, words in strings and comments.
    harmless = """
import numpy as np
model.eval()
np.load(f)
np.load(f, allow_pickle=False)
AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
note = "never pickle, never torch.load"  # import pickle
"""
    assert scan_source(harmless) == []


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb(msgpack.ExtType(5, b"payload")),
        msgpack.packb(msgpack.ExtType(5, b"")),  # an empty ext slipped past max_ext_len=0 once
        msgpack.packb({"a": [1, msgpack.Timestamp(7, 0)]}, datetime=False),  # a timestamp, nested
        msgpack.packb(msgpack.Timestamp(1, 0), datetime=False),
    ],
    ids=["ext", "empty_ext", "nested_timestamp", "timestamp"],
)
def test_the_unpacker_refuses_ext_types(raw: bytes) -> None:
    for payload in (compress(raw), zstandard.ZstdCompressor().compress(raw)):
        with pytest.raises(WireError) as info:
            unpack(payload)
        assert info.value.reason == "bad_msgpack"


def test_an_envelope_carrying_an_ext_type_is_refused() -> None:
    fields = {"v": 2, "type": "act", "job": "j", "sender": "a1", "sid": "s", "seq": 1, "round": 0, "step": 0,
              "corr": None, "ts": 0.0, "body": {"act": msgpack.ExtType(42, b"\x80\x04K\x01.")}}  # fmt: skip
    with pytest.raises(WireError):
        decode_envelope(compress(msgpack.packb(fields, use_bin_type=True)))


def test_checkpoints_hold_only_safetensors_and_json(tmp_path: Path) -> None:
    server = ServerModel(JobConfig(model="tiny-gpt2", cut=2), [2])
    gen = torch.Generator().manual_seed(0)
    hidden, labels = torch.randn(2, 9, 128, generator=gen), torch.randint(0, 50257, (2, 9), generator=gen)
    server.train_on(2, Activations(hidden, labels, torch.tensor([9, 5]), {}))  # so the optimiser has state
    server.finish_step()
    folder = save_checkpoint(tmp_path, 1, server, {"note": "x"})
    assert latest_checkpoint(tmp_path) == folder
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert files and {p.suffix for p in files} <= {".safetensors", ".json"}, files
    assert {p.name for p in files} == {"adapter.safetensors", "optimizer.safetensors", "state.json"}
    for path in files:  # and each is what its name says (torch.save writes a zip of pickles)
        assert not zipfile.is_zipfile(path), path
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict)
        else:
            with safe_open(path, framework="pt") as f:
                assert list(f.keys()), path
