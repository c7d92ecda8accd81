"""The options table (``edpo_plugin/trainer/options.py``) is what ``EpsilonDPOConfig`` holds and TRL's argument
parser reads; ``EpsilonDPOConfig`` refuses every bad setting of tests/option_cases.py, naming the field as a TRL user
writes it and the fix, and accepts the settings at the edge; every check of the table has a case there."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from edpo_plugin.trainer import EpsilonDPOConfig
from edpo_plugin.trainer.options import OPTIONS, REFUSALS, EpsilonDPOFields
from tests.option_cases import ACCEPTED, REFUSED, trl_config


def test_config_fields_are_the_options_table(tmp_path):
    fields = dataclasses.fields(EpsilonDPOFields)
    assert [f.name for f in fields] == [o.name for o in OPTIONS]
    config = EpsilonDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    config_fields = {f.name: f for f in dataclasses.fields(EpsilonDPOConfig)}
    for option in OPTIONS:
        assert getattr(config, option.name) == option.default, option.name
        assert config_fields[option.name].type == option.type, option.name
        assert config_fields[option.name].metadata["help"] == option.help, option.name
    assert config_fields["edpo_head"].metadata["choices"] == ["auto", "naive", "chunked", "triton"]


def test_trl_argument_parser_reads_the_options(tmp_path):
    """TRL scripts build their config with ``HfArgumentParser``, which hands each field's metadata to argparse: the
    options parse with their types, show their help, and a head outside the choices stops the parser."""
    parser = HfArgumentParser(EpsilonDPOConfig)
    base = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "--bf16", "False"]
    (config,) = parser.parse_args_into_dataclasses(
        [*base, "--epsilon", "0.02", "--edpo_head", "naive", "--edpo_head_token_chunk", "8", "--edpo_share_prompt",
         "false", "--edpo_head_check", "false"]
    )  # fmt: skip
    assert (config.epsilon, config.edpo_head, config.edpo_head_token_chunk) == (0.02, "naive", 8)
    assert (config.edpo_share_prompt, config.edpo_head_check, config.edpo_head_vocab_chunk) == (False, False, None)
    assert "ε of the perturbed policies" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses([*base, "--edpo_head", "fast"])


@pytest.mark.parametrize("case", [c for c in REFUSED if c.trl is not None], ids=lambda c: c.case)
def test_trl_config_refuses(tmp_path, monkeypatch, case):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # use_cpu: no CUDA for the trainer, GPU or not
    with pytest.raises(ValueError) as refused:
        trl_config(tmp_path, case.trl)
    assert case.trl_says in str(refused.value)


@pytest.mark.parametrize(("case", "trl"), [(c, t) for c, t, _ in ACCEPTED if t is not None])
def test_trl_config_accepts(tmp_path, case, trl):
    config = trl_config(tmp_path, trl)
    assert all(getattr(config, name) == value for name, value in trl.items()), case


def test_every_check_has_a_case():
    """A new option's check or a new refusal needs a row in tests/option_cases.py (for both sides)."""
    checked = {o.name for o in OPTIONS if o.must} | {r.field for r in REFUSALS} | {"edpo_share_prompt"}
    assert checked <= {c.guards for c in REFUSED}, checked - {c.guards for c in REFUSED}
