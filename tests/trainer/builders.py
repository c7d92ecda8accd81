"""What the trainer-level tests build, in one place: the tiny default's tokenizer and preference rows, tiny random
models over its vocabulary, the arguments of a short fp32 CPU run, the trainer, and a recorder of what one step
computed. Not collected.

The tiny default itself (model, tokenizer, data) is the ``tiny_default`` fixture of tests/conftest.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

import edpo_plugin.trainer.forwards as forwards_module
import edpo_plugin.trainer.trainer as trainer_module
from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer

BETA, EPS = 0.1, 0.2

# The fused head in several tiles over the tiny vocabulary (≤ 48 entries) and a micro-batch's tokens.
HEAD_ARGS = dict(edpo_head="chunked", edpo_head_token_chunk=16, edpo_head_vocab_chunk=24)
# Two optimizer steps at a small learning rate on the default (linear) schedule: what the tests against TRL's
# DPOTrainer and the first-step check tests run.
SHORT_RUN = dict(max_steps=2, learning_rate=1e-3, lr_scheduler_type="linear")


# ------------------------------------------------------------------------------------------------- data, tokenizer


def tokenizer(tiny: dict) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


def preference_rows(tiny: dict, n: int | None = None, split: str = "train") -> Dataset:
    """The first ``n`` rows (all when None) of the tiny default's ``train`` (or ``eval``) preference data."""
    rows = load_dataset("json", data_files=str(tiny[split]), split="train")
    return rows if n is None else rows.select(range(n))


# ----------------------------------------------------------------------------------------------------------- models


def tiny_config(tok: PreTrainedTokenizerBase, **overrides) -> dict:
    """Config keywords of a 2-layer decoder over ``tok``'s vocabulary (rounded up to 8), hidden size 32."""
    base = dict(
        vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return base | overrides


def tiny_llama(tok: PreTrainedTokenizerBase, attn: str | None = None, **config) -> LlamaForCausalLM:
    """An untied fp32 Llama of :func:`tiny_config` from the global RNG; ``attn`` its attention implementation
    (``flash_attention_2`` is set, not loaded: no flash_attn on CPU), else transformers' default."""
    llama_config = LlamaConfig(**tiny_config(tok, tie_word_embeddings=False, **config))
    if attn is not None:
        llama_config._attn_implementation = "sdpa" if attn == "flash_attention_2" else attn
    model = LlamaForCausalLM(llama_config).float()
    if attn is not None:
        model.config._attn_implementation = attn
    return model


def tiny_mixtral(tok: PreTrainedTokenizerBase, **config) -> torch.nn.Module:
    """A Mixtral of :func:`tiny_config` with 4 experts, 2 a token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**tiny_config(tok, num_local_experts=4, num_experts_per_tok=2, **config)))


def tiny_gemma2(tok: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A Gemma-2 whose logit soft cap (10) bites: its final norm scales pre-cap logits to magnitude ~20–60."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(**tiny_config(tok, head_dim=8, final_logit_softcapping=10.0)))
    with torch.no_grad():
        model.model.norm.weight.fill_(60.0)  # Gemma's norm scales by (1 + w): pre-cap logits of magnitude ~20-60
    return model


# Weights large enough that attention across a sequence boundary moves the log-probs (what packing tests need).
ATTENTION_BITES = dict(max_position_embeddings=256, initializer_range=0.2)


def packing_llama(tok: PreTrainedTokenizerBase, attn: str = "sdpa") -> LlamaForCausalLM:
    """A 2-layer Llama (seed 0) with weights large enough that attention across a sequence boundary moves the
    log-probs."""
    torch.manual_seed(0)
    return tiny_llama(tok, attn, **ATTENTION_BITES)


def packing_mixtral(tok: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A 2-layer Mixtral (seed 0) whose forward returns its router auxiliary loss."""
    torch.manual_seed(0)
    return tiny_mixtral(tok, output_router_logits=True, **ATTENTION_BITES).float()


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Add ``scale`` × N(0, 1) (its own generator) to every trainable parameter but the norms'."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "norm" not in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ config, trainer


def run_args(out: Path, **overrides) -> dict:
    """Keywords a short fp32 CPU run gives EpsilonDPOConfig and TRL's DPOConfig alike (4 steps of 4 rows at lr 5e-3,
    β = BETA, logging every step, nothing saved or reported)."""
    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=4,
        learning_rate=5e-3, logging_steps=1, report_to="none", save_strategy="no", beta=BETA, seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, max_length=64, bf16=False,
    )  # fmt: skip
    return base | overrides


def edpo_config(out: Path, **overrides) -> EpsilonDPOConfig:
    """:func:`run_args` at ε = EPS, a constant learning rate and the chunked head in several tiles (``HEAD_ARGS``)."""
    return EpsilonDPOConfig(**run_args(out, lr_scheduler_type="constant", epsilon=EPS, **HEAD_ARGS) | overrides)


def edpo_trainer(
    tiny: dict, model: torch.nn.Module, args: EpsilonDPOConfig, dataset: Dataset, peft_config=None
) -> EpsilonDPOTrainer:
    """The trainer on ``model`` with the tiny tokenizer; the reference a deep copy of ``model`` (PEFT: none, the
    policy with its adapters off)."""
    ref = None if peft_config is not None else copy.deepcopy(model)
    return EpsilonDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset,
                             processing_class=tokenizer(tiny), peft_config=peft_config)  # fmt: skip


def short_trainer(tiny: dict, out: Path, model: torch.nn.Module, peft_config=None, **overrides) -> EpsilonDPOTrainer:
    """:func:`edpo_trainer` for two short steps (``SHORT_RUN``) on the first 8 rows of the tiny default's data."""
    args = edpo_config(out, **(SHORT_RUN | overrides))
    return edpo_trainer(tiny, model, args, preference_rows(tiny, 8), peft_config=peft_config)


def tiny_trainer(tiny: dict, out: Path, padding_free: bool, attn: str = "sdpa", n_rows: int = 16, moe: bool = False,
                 **overrides) -> EpsilonDPOTrainer:  # fmt: skip
    """:func:`edpo_trainer` on :func:`packing_llama` (``moe``: :func:`packing_mixtral`) over ``n_rows`` rows of
    varied lengths (tests/varied_rows.py), so that micro-batches carry padding and prompts of several lengths."""
    from tests.varied_rows import varied_rows

    tok = tokenizer(tiny)
    model = packing_mixtral(tok) if moe else packing_llama(tok, attn)
    dataset = Dataset.from_list(varied_rows(tiny["train"], n_rows))
    return edpo_trainer(tiny, model, edpo_config(out, padding_free=padding_free, **overrides), dataset)


class StepRecorder:
    """Wraps the trainer's ``linear_logprobs`` and ``edpo_loss`` (through ``monkeypatch``) to keep what they returned:
    ``streams`` (detached copies of the four token log-prob streams) and ``outs`` (the loss outputs), one per call."""

    def __init__(self, monkeypatch) -> None:
        self.streams, self.outs = [], []
        real_head, real_loss = forwards_module.linear_logprobs, trainer_module.edpo_loss

        def head(*args, **kwargs):
            out = real_head(*args, **kwargs)
            self.streams.append([t.detach().clone() for t in out])
            return out

        def loss(*args, **kwargs):
            out = real_loss(*args, **kwargs)
            self.outs.append(out)
            return out

        monkeypatch.setattr(forwards_module, "linear_logprobs", head)
        monkeypatch.setattr(trainer_module, "edpo_loss", loss)
