import os
import subprocess
import sys

import torch

# Without a GPU, Triton kernels run under the interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory):
    """The embedded tiny default (model, tokenizer, data), built by its own entry point, examples/make_tiny_default.py;
    the paths of its layout."""
    out = tmp_path_factory.mktemp("tiny")
    script = os.path.join(REPO, "examples", "make_tiny_default.py")
    subprocess.run([sys.executable, script, "--out", str(out)], check=True, capture_output=True, text=True)
    return {
        "root": out,
        "tokenizer": out / "tokenizer",
        "model": out / "model",
        "data": out / "data",
        "train": out / "data" / "train.jsonl",
        "eval": out / "data" / "eval.jsonl",
        "prepared": out / "prepared",
    }
