"""The README stays true where a test can tell: its size, the options table against the real fields and defaults,
the YAML lines against the example the Axolotl tests run, and its two Python snippets executed as written (every
path, anchor and ``edpo_plugin`` name it names: tests/test_docs_names.py, with the docs')."""

from __future__ import annotations

import os
import re

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_readme_is_a_manual_not_a_notebook():
    assert len(README.encode()) <= 12 * 1024


def _options_rows() -> list[list[str]]:
    section = README[README.index("## Options") : README.index("## What is supported")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    assert rows
    return rows


def _literal(cell: str):
    return yaml.safe_load(cell.strip("`"))


def test_options_table_names_real_fields_with_their_defaults():
    """Each option of the options table has a row naming its YAML and EpsilonDPOConfig fields, and its default there
    is the table's, EpsilonDPOConfig's and the Axolotl YAML field's; the other rows name real fields."""
    from edpo_plugin.axolotl.args import EDPOArgs
    from edpo_plugin.trainer import EpsilonDPOConfig
    from edpo_plugin.trainer.options import OPTIONS

    config = EpsilonDPOConfig(output_dir="unused", report_to=[], bf16=False)
    rows = {r[0].strip("`"): r for r in _options_rows()}
    assert [o.yaml for o in OPTIONS] == [name for name in rows if name.startswith("edpo_")], "one row per option"
    for option in OPTIONS:
        _yaml_name, args_name, _meaning, default, _valid = rows[option.yaml]
        assert args_name.strip("`") == option.name
        readme_default = _literal(default)
        assert readme_default == option.default == getattr(config, option.name), option.name
        assert type(readme_default) is type(option.default), option.name  # true is not 1
        assert EDPOArgs.model_fields[option.yaml].default == option.default, option.yaml
    for _yaml_name, args_name, _meaning, _default, _valid in rows.values():
        assert hasattr(config, args_name.strip("`")), f"EpsilonDPOConfig has no {args_name}"
    padding = rows["dpo_padding_free"]
    assert getattr(config, padding[1].strip("`")) is _literal(padding[3]) is False


def test_yaml_snippet_is_the_example_the_axolotl_tests_run():
    (snippet,) = _blocks("yaml")
    example = yaml.safe_load(open(os.path.join(REPO, "yaml_examples", "tiny-edpo.yaml")))
    for key, value in yaml.safe_load(snippet).items():
        assert example[key] == value, key


def test_head_snippet_runs_as_written(capsys):
    snippet = next(b for b in _blocks("python") if "linear_logprobs" in b)
    exec(compile(snippet, "README: the head alone", "exec"), {})
    assert "torch.Size([6, 16])" in capsys.readouterr().out


def test_plain_trl_snippet_runs_as_written(tiny_default, tmp_path, monkeypatch, capsys):
    """Executed as written from a directory holding the tiny default as ``.tiny``: β moves (it would not if the
    decisions never left balance, the look of nothing happening), following the logged decisions β ← β / (1 + ε·s̄)
    once per optimizer step, and the snippet prints each step's β and decisions."""
    snippet = next(b for b in _blocks("python") if "EpsilonDPOTrainer" in b)
    os.symlink(tiny_default["root"], tmp_path / ".tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {}
    exec(compile(snippet, "README: plain TRL", "exec"), namespace)
    trainer, args = namespace["trainer"], namespace["args"]
    assert trainer.state.global_step == args.max_steps
    steps = [h for h in trainer.state.log_history if "kl/avg_steps" in h]
    assert len(steps) == args.max_steps
    beta = args.beta
    for h in steps:
        assert h["kl/beta"] == pytest.approx(beta, rel=1e-9)
        beta /= 1 + args.epsilon * h["kl/avg_steps"]
    assert trainer.beta == pytest.approx(beta, rel=1e-9)
    assert abs(trainer.beta / args.beta - 1) > args.epsilon / 10, "β should visibly move"
    out = capsys.readouterr().out
    printed = re.findall(r"^step (\d+): β (\S+)  s̄ (\S+)  \+ε (\S+)  −ε (\S+)$", out, re.M)
    assert [int(p[0]) for p in printed] == [h["step"] for h in steps]
    assert [float(p[2]) for p in printed] == pytest.approx([h["kl/avg_steps"] for h in steps], abs=0.005)
    assert f"β after {args.max_steps} steps: {trainer.beta}" in out
