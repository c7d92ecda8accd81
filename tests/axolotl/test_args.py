"""The Axolotl side of the options table: ``EDPOArgs`` has one YAML field per option with its default and help, its
YAML → TRL maps agree with the plugin's training args and with Axolotl's own DPO builder, and for every bad setting of
tests/option_cases.py Axolotl's own config validation (``load_cfg``, in tests/workers/axolotl_config_worker.py) and
``EpsilonDPOConfig`` both refuse, each naming the field as its user writes it and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edpo_plugin.axolotl import EDPOPlugin
from edpo_plugin.axolotl.args import CFG_TO_ARGS, DPO_YAML_TO_TRL, TRAINER_CLS, EDPOArgs
from edpo_plugin.trainer.options import OPTIONS
from tests.option_cases import ACCEPTED, REFUSED, trl_config

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "workers" / "axolotl_config_worker.py"


def test_yaml_fields_are_the_options_table():
    fields = EDPOArgs.model_fields
    assert list(fields) == [o.yaml for o in OPTIONS] + ["router_aux_loss_coef"]
    for option in OPTIONS:
        field = fields[option.yaml]
        assert (field.default, field.annotation, field.description) == (option.default, option.type, option.help)
    assert CFG_TO_ARGS == {o.yaml: o.name for o in OPTIONS}


def test_plugin_passes_each_option_to_the_training_args():
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"trainer_cls": TRAINER_CLS, **{o.yaml: f"value of {o.yaml}" for o in OPTIONS}})
    assert EDPOPlugin().get_training_args(cfg) == {o.name: f"value of {o.yaml}" for o in OPTIONS}


# a value of each DPO field, other than its default, for Axolotl's builder to pass on
_SAMPLE = {"dpo_loss_type": ["ipo"], "dpo_loss_weights": [2.0], "dpo_label_smoothing": 0.3, "dpo_use_weighting": True,
           "dpo_use_liger_kernel": True, "dpo_padding_free": True, "precompute_ref_log_probs": True}  # fmt: skip


@pytest.mark.parametrize(("yaml_name", "trl_name"), DPO_YAML_TO_TRL.items())
def test_yaml_names_are_axolotls_and_reach_those_trl_fields(yaml_name, trl_name):
    """The refusals read each DPO setting under the TRL name Axolotl's DPO builder gives it (``rl_beta`` → ``beta``
    in its RL builder; ``context_parallel_size`` stays Axolotl's own)."""
    from axolotl.core.trainers.dpo import DPOStrategy
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.enums import RLType

    assert yaml_name in AxolotlInputConfig.model_fields
    if yaml_name in _SAMPLE:
        kwargs = DPOStrategy.set_training_args_kwargs(DictDefault({"rl": RLType.DPO, yaml_name: _SAMPLE[yaml_name]}))
        assert kwargs[trl_name] == _SAMPLE[yaml_name]
    else:
        assert yaml_name in ("rl_beta", "context_parallel_size")


@pytest.fixture(scope="module")
def validated(tiny_default, tmp_path_factory) -> dict:
    """Axolotl's ``load_cfg`` on the tiny example changed by each case's YAML settings (None: the key left out), on
    a machine without CUDA or ``TRITON_INTERPRET``; one worker process for all."""
    tmp = tmp_path_factory.mktemp("options")
    base = yaml.safe_load((ROOT / "yaml_examples" / "tiny-edpo.yaml").read_text())
    base["base_model"] = str(tiny_default["model"])
    base["datasets"][0]["path"] = str(tiny_default["train"])
    cases = [(c.case, c.yaml) for c in REFUSED if c.yaml is not None] + [(c, y) for c, _, y in ACCEPTED if y]
    jobs = []
    for name, settings in cases:
        config = {**base, "output_dir": str(tmp / name), "dataset_prepared_path": str(tmp / "prepared"), **settings}
        config = {k: v for k, v in config.items() if v is not None}
        jobs.append({"name": name, "kind": "config", "config": config, "world_size": 1})
    jobs_file, results_file = tmp / "jobs.json", tmp / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [sys.executable, str(WORKER), str(jobs_file), str(results_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(results_file.read_text())


@pytest.mark.parametrize("case", [c for c in REFUSED if c.yaml is not None], ids=lambda c: c.case)
def test_axolotl_and_trl_both_refuse(validated, tmp_path, monkeypatch, case):
    result = validated[case.case]
    assert not result["ok"], f"Axolotl accepted {case.yaml}"
    assert case.yaml_says in result["error"], result["error"]
    if case.trl is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError) as refused:
            trl_config(tmp_path, case.trl)
        assert case.trl_says in str(refused.value)


@pytest.mark.parametrize(("case", "trl", "yaml_settings"), [c for c in ACCEPTED if c[2]])
def test_axolotl_and_trl_both_accept(validated, tmp_path, case, trl, yaml_settings):
    result = validated[case]
    assert result["ok"], result.get("error")
    if trl is not None:
        trl_config(tmp_path, trl)
