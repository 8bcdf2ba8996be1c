import json
import math

import pytest

from sarkd_diag.contract.config import DistillConfig, build_config, read_config_file
from sarkd_diag.contract.errors import BadInput


def test_defaults_validate_and_name_the_embedded_models():
    cfg = DistillConfig().validate()
    assert cfg.teacher_model.startswith("embedded:") and cfg.student_model.startswith("embedded:")
    assert cfg.precision == "auto" and cfg.probes == "standard" and cfg.on_nonfinite == "stop"


@pytest.mark.parametrize("options, message", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"alpha_kd": -0.1}, "alpha"),
    ({"alpha_kd": 0.0, "alpha_ce": 0.0}, "both 0"),
    ({"student_lr": math.nan}, "finite"),
    ({"temperature": math.inf}, "finite"),
    ({"train_steps": 0}, "train-steps"),
    ({"block_size": 0}, "block-size"),
    ({"per_device_batch_size": 0}, "batch-size"),
    ({"eval_steps": -5}, "eval-steps"),
    ({"jsd_beta": 1.0}, "jsd-beta"),
    ({"kd_loss": "kl"}, "kd-loss"),
    ({"probes": "all"}, "probes"),
    ({"on_nonfinite": "reset"}, "on-nonfinite"),
    ({"model_dtype": "fp16"}, "model-dtype"),
    ({"resume": True}, "output-dir"),
])
def test_bad_values_are_rejected_with_the_option_named(options, message):
    with pytest.raises(BadInput, match=message):
        DistillConfig(**options).validate()


def test_command_line_wins_over_config_file_which_wins_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train-steps: 7\ntemperature: 3.0\nstudent_lr: 0.01\n")
    cfg = build_config({"temperature": 1.5, "alpha_kd": None}, path)
    assert (cfg.train_steps, cfg.temperature, cfg.student_lr, cfg.alpha_kd) == (7, 1.5, 0.01, 0.5)


def test_a_runs_own_config_json_is_a_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"options": {**DistillConfig(train_steps=9).to_dict()}, "precision": {}}))
    assert build_config({}, path).train_steps == 9


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "mapping"),
    ('{"no_such_option": 1}', "unknown option"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(BadInput, match=message):
        read_config_file(path)


def test_missing_config_file():
    with pytest.raises(BadInput, match="no such file"):
        read_config_file("/nonexistent/c.yaml")
