"""The head's plan: what the engine runs for one call, and the loop shape, blocks and tile defaults it runs with.

A :class:`HeadPlan` fixes what :mod:`edpo_plugin.ops.engine` does for one call: the fold (``"chunked"``: PyTorch,
``"triton"``: one kernel per tile), the token chunk and vocabulary tile, the GEMM policy (tensor cores: bf16/fp16
operands with fp32 output, on CUDA) and, for a trainable head, whether the forward keeps the policy's softmax weights
``P`` for the backward (``keep_probs``: 4 matmul-equivalents instead of 5, at ``M·V`` elements of workspace). The
engine iterates the plan's own :meth:`HeadPlan.token_chunks` and :meth:`HeadPlan.vocab_tiles`;
:mod:`edpo_plugin.ops.launches` lists the kernels that plan launches, :mod:`edpo_plugin.ops.cost_model` models
them, and :mod:`edpo_plugin.ops.dispatch` is the planner (CPU: :data:`CPU_TILES`; CUDA: the modelled-fastest plan
whose workspace fits the budget). Tile defaults, the planner's candidates, the Triton kernels' block sizes and the
lazy fold's τ live here, once.

Imports only torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from edpo_plugin.ops.transform import IDENTITY, LogitTransform

# ------------------------------------------------------------------------------------- tiles, blocks, defaults

CPU_TILES = (1024, 4096)  # what measures best on CPU (docs/benchmarks.md): token chunk × vocabulary tile
TOKEN_CHUNKS = (1024, 2048, 4096, 8192, 16384, 32768)  # the planner's candidates on CUDA
VOCAB_CHUNKS = (4096, 8192, 16384, 32768, 65536)
DEFAULT_WORKSPACE_MB = 4096  # head workspace budget on CUDA: 5 % of an 80 GB card
LAZY_TAU_MAX = 16.0  # nats: the lazy fold lets P = exp(z − r) grow to e^16 before it moves r


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton kernels run on the CPU, in Python)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fold_blocks(kind: str, cols: int, interpreted: bool) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of a Triton kernel of the head (``kind``: ``"fold"``, ``"grad_fold"``,
    ``"targets"``, ``"finish"``; ``cols``: the columns it sweeps). On a GPU: the fold 4 rows × 512 columns (a
    1024-row chunk gives 256 programs), the gradient folds and the direction's finish 32 × 128, the target dot
    products 16 rows × 256; under the interpreter, where each program and loop step costs Python time, few large
    blocks."""
    if interpreted:
        return 64, min(4096, 1 << max(0, cols - 1).bit_length()), 4
    return {"fold": (4, 512, 8), "targets": (16, 256, 4)}.get(kind, (32, 128, 4))


def lazy_tau(p_dtype: torch.dtype, transform: LogitTransform) -> float:
    """How far (nats) a tile's maximum may pass the row's reference before the lazy fold moves it: ``P ≤ e^τ·|J|``
    must stay 4× inside the ``P`` dtype's range (fp16: about 9.7 nats; bf16 / fp32: :data:`LAZY_TAU_MAX`)."""
    room = math.log(torch.finfo(p_dtype).max) - math.log(4.0) - math.log(max(1.0, abs(transform.scale)))
    return max(0.0, min(LAZY_TAU_MAX, room))


# ---------------------------------------------------------------------------------------------- shape and plan


@dataclass(frozen=True)
class HeadShape:
    """One call of the head: ``tokens`` positions, ``valid`` of them scored (labels not ignored), hidden size
    ``dim``, ``vocab`` rows of ``lm_head`` (this rank's on a shard), the inputs' ``dtype``, and the head kind:
    ``"frozen"`` (only the hidden states need grad), ``"trainable"`` (weight, maybe bias, need grad), ``"none"``."""

    tokens: int
    valid: int
    dim: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    head: str = "frozen"
    shared: bool = True  # reference lm_head weight is the policy's (PEFT)
    bias: bool = False
    ref_bias: bool = False
    transform: LogitTransform = IDENTITY
    label_bytes: int = 8
    want_hidden: bool = True
    want_weight: bool = True  # trainable head: the weight needs grad (else only the bias)
    want_bias: bool = True  # trainable head with a bias: the bias needs grad

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class HeadPlan:
    """What the engine runs for one call (see the module docstring)."""

    impl: str  # "chunked" (PyTorch fold) or "triton"
    head: str  # as HeadShape.head
    token_chunk: int
    vocab_chunk: int
    tensor_cores: bool
    p_dtype: torch.dtype  # dtype of P and of the logit gradient: the GEMM operand dtype
    keep_probs: bool = False
    interpreted: bool = False  # Triton under the interpreter (its block sizes)

    @property
    def keeps_direction(self) -> bool:
        return self.head == "frozen"

    @property
    def keeps_probs_or_direction(self) -> bool:
        return self.keep_probs or self.keeps_direction

    @property
    def planes(self) -> int:
        """fp32 planes of the forward tile buffer: the PyTorch fold writes both mixes into planes 2 and 3."""
        return 2 if self.impl == "triton" else 4

    def token_chunks(self, n: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.token_chunk, n)) for a in range(0, n, self.token_chunk)]

    def vocab_tiles(self, vocab: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.vocab_chunk, vocab)) for a in range(0, vocab, self.vocab_chunk)]

    def describe(self) -> str:
        keep = ", keeps P" if self.keep_probs else ""
        return f"{self.impl} {self.token_chunk}×{self.vocab_chunk}{keep}"
