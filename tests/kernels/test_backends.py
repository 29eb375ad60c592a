"""The backend table (fod_kernels._backends.BACKEND_TABLE) and the extension list: one place each."""
import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch

import fod_kernels as fk
from fod_kernels import _backends, _build_flags, _ext

ROOT = Path(__file__).resolve().parents[2]


def test_backends_derive_from_the_table():
    assert fk.BACKENDS == tuple(b.name for b in _backends.BACKEND_TABLE) == ("reference", "cpu", "triton", "cuda")
    assert set(fk.available_backends()) == set(fk.BACKENDS)
    for b in _backends.BACKEND_TABLE:
        mod = importlib.import_module(b.module)
        if b.name != "reference":
            assert _backends.get_runner(b.name) is mod.run
            assert callable(mod.status) and callable(mod.supports_device)
    with pytest.raises(ValueError, match="unknown kernel backend 'reference'"):
        _backends.get_runner("reference")


def test_auto_order_comes_from_the_table(monkeypatch):
    assert _backends.auto_order("cuda") == ("cuda", "triton")  # placeholder order until GPU timings exist
    assert _backends.auto_order("cpu") == ("cpu",)
    assert _backends.auto_order("mps") == ()
    # One edit of the table changes "auto": with cpu's preference removed, auto on CPU falls back (and warns).
    table = tuple(b._replace(auto=None) if b.name == "cpu" else b for b in _backends.BACKEND_TABLE)
    monkeypatch.setattr(_backends, "BACKEND_TABLE", table)
    monkeypatch.setattr(_backends, "_warned", set())
    monkeypatch.delenv("FOD_KERNELS_QUIET", raising=False)
    assert _backends.auto_order("cpu") == ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backends.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert any("no fused kernel backend for cpu" in str(w.message) for w in caught)


def test_readme_table_renders_every_backend():
    md = _backends.backend_table_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| backend |") and len(lines) == 2 + len(_backends.BACKEND_TABLE)
    for b, line in zip(_backends.BACKEND_TABLE, lines[2:]):
        assert line.startswith(f"| `{b.name}` |") and b.dtypes in line
    assert "| cuda: 1 |" in lines[2 + fk.BACKENDS.index("cuda")]
    assert "| cuda: 2 |" in lines[2 + fk.BACKENDS.index("triton")]


def test_docs_carry_the_generated_table():
    """docs/operator.md's backend table is backend_table_markdown()'s output, verbatim (regenerate it when the
    table changes)."""
    doc = (ROOT / "docs" / "operator.md").read_text()
    assert _backends.backend_table_markdown().rstrip("\n") in doc


def test_readme_operator_example_runs():
    """The README's operator example, as written (its first python block)."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "fk.i2correlation" in code and "fk.I2Correlation" in code
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["h"].shape == scope["x"].shape and torch.isfinite(scope["h"]).all()


def test_one_list_of_extension_sources():
    """setup.py and the JIT build read the sources from _build_flags.EXTENSIONS; setup.py names none itself."""
    assert _ext.EXTENSIONS is _build_flags.EXTENSIONS
    for name, (sources, is_cuda) in _build_flags.EXTENSIONS.items():
        for s in sources:
            assert (ROOT / "csrc" / s).is_file(), s
    setup = (ROOT / "setup.py").read_text()
    assert "flags.EXTENSIONS" in setup
    literals = {n.value for n in ast.walk(ast.parse(setup)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not [s for s in literals if re.search(r"\.(cpp|cu)$", s)], "setup.py lists sources of its own"


def test_cuda_arch_flags_emit_ptx_for_the_newest(monkeypatch):
    monkeypatch.setenv("FOD_CUDA_ARCH", "80;90")
    assert _build_flags.cuda_arch_flags() == ["-gencode", "arch=compute_80,code=sm_80", "-gencode",
                                              "arch=compute_90,code=sm_90", "-gencode",
                                              "arch=compute_90,code=compute_90"]
    monkeypatch.delenv("FOD_CUDA_ARCH")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6 9.0a+PTX")
    assert _build_flags.cuda_arch_flags()[-2:] == ["-gencode", "arch=compute_90,code=compute_90"]
    assert "arch=compute_90a,code=sm_90a" in _build_flags.cuda_arch_flags()


def test_mask_and_memory_support_is_a_column_of_the_table():
    from fod_kernels import functional
    assert functional.EXTENDED_BACKENDS == tuple(b.name for b in _backends.BACKEND_TABLE if b.extended)
    md = _backends.backend_table_markdown().splitlines()
    assert "masks, S != L" in md[0]
    for b, line in zip(_backends.BACKEND_TABLE, md[2:]):
        assert f"| {'yes' if b.extended else 'no'} |" in line
