"""ConfigError: configuration errors name their field, in the API's words and in a front end's."""

import copy
import pickle

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mpolstm import CompressionConfig, ConfigError, compress
from mpolstm.harness.cli import app

FLAGS = {"target_ratio": "--ratio", "max_bond": "--max-bond", "rel_tol": "--rel-tol", "calibration": "--calibrate"}


def _raised(make) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        make()
    assert isinstance(caught.value, ValueError)
    return caught.value


@pytest.mark.parametrize("field,kwargs,api,flags", [
    ("max_bond", {"max_bond": 0}, "max_bond must be a positive integer or None, got 0",
     "--max-bond must be a positive integer, got 0"),
    ("rel_tol", {"rel_tol": 2}, "rel_tol must be a number in (0, 1) or None, got 2",
     "--rel-tol must be a number in (0, 1), got 2"),
    ("rel_tol", {"rel_tol": 0.1, "target_ratio": 4},
     "rel_tol cannot be combined with a budget (target_ratio/max_params/max_macs); choose one",
     "--rel-tol cannot be combined with --ratio; choose one"),
    ("target_ratio", {"target_ratio": 0.5},
     "target_ratio must be a finite number above 1 (1 compresses nothing), got 0.5",
     "--ratio must be a finite number above 1 (1 compresses nothing), got 0.5"),
    # issue 31: a budget that compresses nothing used to give a same-size model with 15-20% error per weight
    ("target_ratio", {"target_ratio": 1}, "target_ratio must be a finite number above 1 (1 compresses nothing), got 1",
     "--ratio must be a finite number above 1 (1 compresses nothing), got 1"),
])
def test_config_errors_name_the_field_for_the_api_and_for_a_front_end(field, kwargs, api, flags):
    error = _raised(lambda: CompressionConfig(**kwargs))
    assert error.field == field and str(error) == api and error.render(FLAGS) == flags
    assert str(copy.copy(error)) == api and str(pickle.loads(pickle.dumps(error))) == api


def test_sizing_calibration_and_budget_errors_name_their_fields():
    model = nn.Sequential(nn.Linear(16, 16))
    unsized = _raised(lambda: compress(model, CompressionConfig()))
    assert unsized.field == "target_ratio" and "compress needs a size for module '0'" in str(unsized)
    assert unsized.render(FLAGS).startswith("give a size: --ratio, --max-bond or --rel-tol")
    bad = _raised(lambda: compress(model, CompressionConfig(target_ratio=2), calibration=[torch.zeros(2, 5)]))
    assert bad.field == "calibration" and str(bad).startswith("calibration batch 0 failed in the model")
    assert bad.render(FLAGS).startswith("--calibrate batch 0 failed in the model")
    tight = _raised(lambda: compress(nn.Sequential(nn.Linear(64, 64)), CompressionConfig(target_ratio=1e5)))
    assert str(tight).endswith("raise max_params or lower target_ratio") and tight.render(FLAGS).endswith("lower --ratio")


@pytest.mark.parametrize("args,line", [
    (["--max-bond", "0"], "error: --max-bond must be a positive integer, got 0"),
    (["--rel-tol", "1.5"], "error: --rel-tol must be a number in (0, 1), got 1.5"),
])
def test_cli_says_the_flag_without_python_wording(tmp_path, args, line):
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "out"), "--factory", "absent:build", *args])
    assert result.exit_code == 2 and result.output.strip() == line and "None" not in result.output
    assert not (tmp_path / "out").exists()
