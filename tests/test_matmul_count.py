"""Matmul-equivalents per head path, counted by a dispatch mode that sees every mm variant (scripts/count_matmuls.py),
and the rule that the Triton path runs no fp32 GEMM on bf16 inputs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from edpo_plugin.ops import triton_available

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from count_matmuls import count  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_path_counts(dtype):
    frozen, trainable = count("chunked", "frozen", dtype), count("chunked", "trainable", dtype)
    assert frozen["total"] == pytest.approx(3, abs=0.05) and trainable["total"] == pytest.approx(5, abs=0.05)
    # the portable fallback upcasts: fp32 GEMMs whatever the input dtype (module docstring of ops/chunked.py)
    assert frozen["gemm_operand_dtypes"] == trainable["gemm_operand_dtypes"] == ["float32xfloat32"]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_path_has_no_fp32_gemm_on_bf16_inputs(dtype):
    frozen, trainable = count("triton", "frozen", dtype), count("triton", "trainable", dtype)
    assert frozen["torch_matmul_equivalents"] == 0  # everything inside the forward kernel
    two_term = dtype != torch.float32
    # the weight gradient's GEMM: [G_hi; G_lo]ᵀ[H; H] on bf16 (K = 2M), Gᵀ H on fp32
    assert trainable["torch_matmul_equivalents"] == pytest.approx(2 if two_term else 1, abs=0.01)
    name = str(dtype).replace("torch.", "")
    assert trainable["gemm_operand_dtypes"] == [f"{name}x{name}"]
    assert (frozen["total"], trainable["total"]) == ((4, 7) if two_term else (3, 5))
