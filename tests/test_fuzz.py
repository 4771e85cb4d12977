"""Hostile input: fuzzed checkpoint files for load_checkpoint / fit(resume=True), fuzzed arguments for
mpo.decompose, and a scan of src/ for unpickling. Every bad input must be a ValueError."""

import math
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch import nn
from torch.nn import functional as F

from mpolstm.checkpoint import write_file
from mpolstm.harness.training import ACCURACY, BEST_FORMAT, CHECKPOINT_FORMAT, fit, load_checkpoint
from mpolstm.mpo import decompose

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
X, Y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2


def train(out, epochs=1, resume=False):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    fit(model, [(X, Y)], [(X, Y)], F.cross_entropy, ACCURACY, epochs=epochs, lr=0.1, out_dir=out, resume=resume,
        progress=False)
    return model


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    out = tmp_path_factory.mktemp("valid")
    train(out)
    data = (out / "checkpoint.safetensors").read_bytes()
    return data, load_checkpoint(out / "checkpoint.safetensors")


def loads_or_value_error(path, fmt=CHECKPOINT_FORMAT):
    """load_checkpoint either succeeds or raises a ValueError (anything else fails the test)."""
    try:
        load_checkpoint(path, fmt)
        return True
    except ValueError as e:
        assert str(e) and str(path) in str(e)
        return False


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4), max_leaves=12)


@FUZZ
@given(cut=st.integers(min_value=0))
def test_truncated_checkpoint(valid, tmp_path, cut):
    data = valid[0]
    path = tmp_path / "c.safetensors"
    path.write_bytes(data[: cut % len(data)])
    assert not loads_or_value_error(path)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "c.safetensors"
    path.write_bytes(data)
    assert not loads_or_value_error(path)


@FUZZ
@given(size=st.integers(min_value=0, max_value=2**64 - 1), tail=st.binary(max_size=64))
def test_declared_header_size_is_checked_before_reading(tmp_path, size, tail):
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", size) + tail)
    assert not loads_or_value_error(path)


@FUZZ
@given(offset=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_flipped_byte(valid, tmp_path, offset, byte):
    """Any changed byte (header, metadata, state or tensor data) is refused: the checksum covers it all."""
    data = bytearray(valid[0])
    data[offset % len(data)] = byte
    path = tmp_path / "c.safetensors"
    path.write_bytes(bytes(data))
    assert loads_or_value_error(path) == (bytes(data) == valid[0])


def test_damaged_checkpoint_refuses_to_resume_naming_the_file(tmp_path):
    """A flipped bit in the weights of a real checkpoint: resume refuses in one line naming the file
    instead of training on from damaged weights."""
    train(tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x04  # inside the last tensor's float data: still a well-formed file
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged") as refused:
        train(tmp_path, epochs=2, resume=True)
    message = str(refused.value)
    assert str(path) in message and "\n" not in message


@FUZZ
@given(meta=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
       names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3, unique=True),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]))
def test_foreign_safetensors(tmp_path, meta, names, dtype):
    path = tmp_path / "c.safetensors"
    path.write_bytes(st_save({n: torch.zeros(2, dtype=dtype) for n in names}, metadata=meta))
    assert not loads_or_value_error(path)
    path.write_bytes(st_save({n: torch.zeros(2, dtype=dtype) for n in names},
                             metadata={**meta, "format": CHECKPOINT_FORMAT, "state": "{}"}))
    assert not loads_or_value_error(path)  # right format, empty state


@FUZZ
@given(state=json_values)
def test_random_state_document(tmp_path, state):
    path = tmp_path / "c.safetensors"
    write_file(path, {"model/w": torch.zeros(2)}, CHECKPOINT_FORMAT, state)
    assert not loads_or_value_error(path)
    write_file(path, {"model/w": torch.zeros(2)}, BEST_FORMAT, state)
    assert not loads_or_value_error(path, BEST_FORMAT)


def test_deeply_nested_state_and_missing_state(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(st_save({}, metadata={"format": CHECKPOINT_FORMAT, "state": "[" * 100_000}))
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_checkpoint(path)
    path.write_bytes(st_save({}, metadata={"format": CHECKPOINT_FORMAT}))
    with pytest.raises(ValueError, match="no 'state' metadata"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path)


def _mutate(doc, path, value):
    if len(path) == 1:
        return {**doc, path[0]: value}
    return {**doc, path[0]: _mutate(doc[path[0]], path[1:], value)}


FIELDS = [("epoch",), ("step",), ("optimizer",), ("optimizer", "name"), ("optimizer", "param_groups"),
          ("optimizer", "scalar_state"), ("rng",), ("rng", "torch"), ("rng", "numpy"), ("rng", "python"),
          ("rng", "loader"), ("rng", "cuda"), ("best_metric",), ("best_epoch",), ("bad_epochs",), ("stopped",),
          ("history",), ("callbacks",), ("shapes",)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=json_values, tensor_name=st.none() | st.text(max_size=12))
def test_mutated_checkpoint_fields_then_resume(valid, tmp_path, field, value, tensor_name):
    """A real checkpoint with one field replaced (or one tensor added): loading and resuming either
    work or raise ValueError."""
    tensors, state = valid[1]
    tensors = dict(tensors)
    if tensor_name is not None:
        tensors[tensor_name] = torch.zeros(1)
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    path = out / "checkpoint.safetensors"
    write_file(path, tensors, CHECKPOINT_FORMAT, _mutate(state, field, value))  # with a valid checksum
    if loads_or_value_error(path):
        try:
            train(out, epochs=2, resume=True)
        except ValueError as e:
            assert str(e)


# ------------------------------------------------------------------------------ decompose
factor = st.integers(min_value=-2, max_value=7) | st.sampled_from([True, 2.0, None, "2", 10**12])
factors = st.lists(factor, max_size=4) | st.tuples(st.integers(1, 6), st.integers(1, 6)) | st.integers(1, 6)
bond = st.none() | st.integers(min_value=-3, max_value=10) | st.sampled_from([True, 2.5, "4", 2**70, math.nan])
tol = st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, True, "0.1", -0.5])
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                          torch.complex64, torch.uint8])


@FUZZ
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), dtype=dtypes, in_f=factors, out_f=factors, max_bond=bond,
       rel_tol=tol, poison=st.sampled_from([None, math.nan, math.inf, -math.inf]), seed=st.integers(0, 2**16))
def test_decompose_bad_arguments(rows, cols, dtype, in_f, out_f, max_bond, rel_tol, poison, seed):
    matrix = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    if poison is not None and dtype.is_floating_point:
        matrix[seed % rows, seed % cols] = poison
    try:
        mpo = decompose(matrix, in_f, out_f, max_bond=max_bond, rel_tol=rel_tol)
    except ValueError as e:
        assert str(e)
        return
    # accepted: the arguments were valid and the result is sound
    assert dtype in (torch.float32, torch.float64) and poison is None
    assert math.prod(in_f) == rows and math.prod(out_f) == cols
    assert mpo.to_matrix().shape == (rows, cols)
    assert math.isfinite(mpo.report.rel_error)


def test_decompose_rejects_a_non_tensor_and_wrong_rank():
    for bad in ([[1.0, 2.0]], torch.zeros(2, 2, 2), torch.zeros(4)):
        with pytest.raises(ValueError, match="2-D tensor"):
            decompose(bad, [2], [2])


@pytest.mark.parametrize("case", ["float16", "bfloat16", "int factors"])
def test_decompose_rejects_half_precision_and_scalar_factors(case):
    with pytest.raises(ValueError, match="float32 or float64|sequence of positive integers"):
        if case == "int factors":
            decompose(torch.randn(4, 6), 4, [6])
        else:
            decompose(torch.randn(4, 6).to(getattr(torch, case)), [2, 2], [2, 3])


# ------------------------------------------------------------------------------ no unpickling
def test_source_never_unpickles():
    offenders = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"\btorch\.load\(", text):
            call = text[m.end(): text.find(")", m.end()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path}: torch.load without weights_only=True")
        for m in re.finditer(r"\b(?:np|numpy)\.load\(", text):
            if "allow_pickle=False" not in text[m.end(): text.find(")", m.end()) + 1]:
                offenders.append(f"{path}: np.load without allow_pickle=False")
        for pattern in (r"^\s*(?:import|from)\s+(?:pickle|cPickle|dill|cloudpickle|shelve|marshal)\b",
                        r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False", r"\bpickle\.loads?\(",
                        r"_object\(|\bgather_object\b|\bbroadcast_object_list\b"):
            if re.search(pattern, text, re.M):
                offenders.append(f"{path}: matches {pattern}")
    assert offenders == []
