"""Each layer imports only what it is allowed to: a user can take the kernel or the math without TRL or Axolotl."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("edpo_plugin", ["trl", "axolotl", "transformers"]),
        ("edpo_plugin.ops", ["trl", "axolotl", "transformers"]),
        ("edpo_plugin.loss", ["trl", "axolotl", "transformers"]),
        ("edpo_plugin.trainer", ["axolotl"]),
    ],
)
def test_layer_imports(module, forbidden):
    code = f"import sys, {module}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"{module} imported {done.stdout.strip()}"


def test_plugin_resolves_lazily():
    code = "import edpo_plugin; print(edpo_plugin.EDPOPlugin.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "edpo_plugin.axolotl"
