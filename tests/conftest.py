import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run under the interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory):
    """The embedded tiny default (model, tokenizer, data) built by scripts/make_tiny_default.py."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from make_tiny_default import build_tiny_default

    return build_tiny_default(tmp_path_factory.mktemp("tiny"))
