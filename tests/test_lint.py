"""Project-wide static checks that are cheap: ruff, and tokenizer/ torch-free at run time (the import rules
themselves: tests/test_architecture.py, docs/ARCHITECTURE.md)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run([ruff, "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tokenizer_does_not_import_torch():
    """tokenizer/ stays torch-free: import it in a fresh interpreter and check sys.modules."""
    code = ("import sys, importlib, pkgutil, tokenizer\n"
            "for m in pkgutil.iter_modules(tokenizer.__path__):\n"
            "    importlib.import_module('tokenizer.' + m.name)\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
