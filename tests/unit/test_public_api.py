"""Every name in ``model_tailor.__all__`` resolves; the package imports without transformers."""

from __future__ import annotations

import subprocess
import sys

import model_tailor


def test_all_public_names_resolve():
    for name in model_tailor.__all__:
        assert getattr(model_tailor, name) is not None


def test_import_is_light():
    code = "import sys, model_tailor; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
