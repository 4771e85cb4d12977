"""Save and load MPO modules and compressed models; safetensors + JSON, never pickle.

``save(model, path)`` writes the directory ``path`` (refusing an existing one unless ``overwrite=True``,
which replaces it whole) with two files:

    model.safetensors   model.state_dict() (safetensors: raw tensors, no code)
    config.json         {"format": "mpolstm", "format_version": 1, "library_version",
                         "standalone", "model_class", "weights_sha256",
                         "modules": {dotted name: {"config": mpo_config(), "dtype": "float32",
                                                   "errors": {weight: achieved rel. error}}}}

``standalone`` is true when ``model`` is itself an MPO module (its name is ""): ``load(path)``
rebuilds it with ``Class.from_config`` and loads the weights. Otherwise ``load(path,
base_model)`` replaces the listed modules of a freshly built base model (e.g. the dense
architecture) by ``from_config``'ed MPO modules and loads the whole state_dict strictly,
as PEFT does. The folder is written under a temporary name beside ``path`` and renamed into
place (``mpolstm.atomic``); the weights' SHA-256 in config.json ties the pair together, so a
corrupt, truncated, foreign or mismatched file is refused with a ValueError naming it.
Shapes implied by the config are checked (on the meta device) against the weights file
before anything is allocated. requires_grad flags (e.g. from freeze_central) are not saved.

A module with int8 cores (:func:`mpolstm.quantize`) has ``"int8": true`` in its config; each core is
written as int8 beside its float32 scales (``<weight>_scales.<k>``), so the data section holds 1 byte
an entry + 4 a scale, and ``load`` restores it as ``(q.float() * scale).to(dtype)``, bit-exact. A core
off its grid (trained after quantize) is refused by ``save``; a scale that is not finite and positive,
or an int8 tensor where a float one is expected (or the reverse), by ``load``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence, cast

import torch
from safetensors.torch import save as st_save
from torch import nn

from .atomic import atomic_folder, atomic_write_bytes, check_target
from .mpo import TruncationReport, dequantize_int8
from .nn.base import MPOWeights
from .nn.registry import MPOModule, is_mpo_module, layer_type_of_mpo, mpo_class, registered_mpo_names, replace_module
from .nn.shared import SharedLayer
from .tensorfile import read_header, read_tensors
from .version import __version__

__all__ = ["save", "load", "read_verified", "Verified", "dequantize_cores", "WEIGHTS_FILE", "CONFIG_FILE"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT, FORMAT_VERSION = "mpolstm", 1
_MAX_CONFIG_BYTES = 16 << 20
_MAX_CONFIG_INT = 1 << 40
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- save


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _dtype_name(module: nn.Module) -> str:
    first = next(iter(module.parameters()), None)
    return "float32" if first is None else str(first.dtype).removeprefix("torch.")


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
         files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``model`` (an MPO module or a model containing MPO modules) to the folder ``path``, with
    ``files`` ({name: bytes}, e.g. the harness's architecture.json) beside the model. An existing
    ``path`` (unless an empty folder) is refused unless ``overwrite``, which replaces it whole: the
    folder is written under a temporary name beside it and swapped in, so no file of the old folder
    survives (``mpolstm.atomic``). Missing parents are created. Returns ``path``."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"save expects an nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory; save writes a directory "
                         f"holding {WEIGHTS_FILE} and {CONFIG_FILE}")
    check_target(path, overwrite)
    extra = dict(files or {})
    clash = sorted(set(extra) & {WEIGHTS_FILE, CONFIG_FILE})
    if clash or not all(isinstance(v, bytes) and n and "/" not in n for n, v in extra.items()):
        raise ValueError(f"files must map plain file names other than {WEIGHTS_FILE} and {CONFIG_FILE} to bytes, "
                         f"got {sorted(extra)}")
    data, text = _serialise(model)
    with atomic_folder(path, overwrite) as folder:
        for name, content in {WEIGHTS_FILE: data, CONFIG_FILE: text.encode(), **extra}.items():
            atomic_write_bytes(folder / name, content)
    return path


def _serialise(model: nn.Module) -> tuple[bytes, str]:
    """The weights file's bytes (int8 cores as int8) and config.json's text of ``model``."""
    standalone = is_mpo_module(model)
    named = ([("", cast(MPOModule, model))] if standalone  # (is_mpo_module: an MPOModule's protocol)
             else [(n, cast(MPOModule, m)) for n, m in model.named_modules() if n and is_mpo_module(m)])
    int8 = {}
    for name, m in named:
        if isinstance(m, MPOWeights) and m.int8:
            try:
                int8.update({_prefix(name) + key: q for key, (q, _) in m._int8_values().items()})
            except ValueError as exc:  # a core left its grid
                raise ValueError(f"cannot save module {name or type(m).__name__!r}: {exc}") from None
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; only tensors are saved")
        value = int8.get(key, value).detach().cpu().contiguous()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        tensors[key] = value.clone() if ptr is not None and ptr in seen else value  # tied weights
        seen.add(ptr)
    data = st_save(tensors, metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "standalone": standalone,
        "model_class": type(model).__name__,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "modules": {name: {"config": m.mpo_config(), "dtype": _dtype_name(m),
                           "errors": {w: r.rel_error for w, r in m.reports.items()}} for name, m in named},
    }
    try:
        return data, json.dumps(config, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the model's MPO configs are not JSON-serialisable: {exc}") from None


# ----------------------------------------------------------------------------- load


def read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ValueError(f"{file}: missing; expected a directory written by mpolstm.save")
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{file}: {file.stat().st_size} bytes, more than a config can be ({_MAX_CONFIG_BYTES})")
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc}); corrupt or not written by mpolstm.save") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{file}: not an mpolstm config (no \"format\": \"{FORMAT}\")")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {config.get('format_version')!r}, this library reads "
                         f"{FORMAT_VERSION} (written by mpolstm {config.get('library_version')!r})")
    checks = (("standalone", bool), ("model_class", str), ("weights_sha256", str), ("modules", dict))
    for key, kind in checks:
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{file}: field {key!r} must be a {kind.__name__}, got {config.get(key)!r}")
    for name, entry in config["modules"].items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("config"), dict)
                or entry.get("dtype") not in _DTYPES):
            raise ValueError(f"{file}: module {name!r} needs {{\"config\": {{...}}, \"dtype\": one of "
                             f"{sorted(_DTYPES)}}}, got {entry!r}")
        _check_ints(entry["config"], file, name)
    if config["standalone"] and list(config["modules"]) != [""]:
        raise ValueError(f"{file}: a standalone save must list exactly one module named \"\"")
    if not config["standalone"] and "" in config["modules"]:
        raise ValueError(f"{file}: only a standalone save may list a module named \"\"")
    return config


def _check_ints(value: Any, file: Path, name: str) -> None:
    """Refuse absurd sizes before any module is built."""
    if isinstance(value, dict):
        for v in value.values():
            _check_ints(v, file, name)
    elif isinstance(value, list):
        for v in value:
            _check_ints(v, file, name)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_CONFIG_INT:
        raise ValueError(f"{file}: module {name!r} has a size {value} larger than {_MAX_CONFIG_INT}")


def _mpo_class(name: Any, file: Path, module: str) -> type[nn.Module]:
    cls = mpo_class(name)
    if cls is None:
        raise ValueError(f"{file}: module {module!r} has class {name!r}; expected one of {registered_mpo_names()}")
    return cls


def _build(cls: type[nn.Module], config: Mapping[str, Any], file: Path, name: str, device: str | torch.device
           ) -> MPOModule:
    try:
        with torch.device(device):
            return cast(type[MPOModule], cls).from_config(config)  # a registered MPO class
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"{file}: module {name!r}: invalid {cls.__name__} config: {exc}") from None


def _check_base_module(base: nn.Module, probe: MPOModule, name: str, file: Path) -> None:
    entry = layer_type_of_mpo(probe)
    torch_type = entry.torch_type if entry is not None else cast(SharedLayer, probe).torch_type  # a Shared* layer
    if not isinstance(base, (type(probe), torch_type)):
        raise ValueError(f"{file}: module {name!r} was saved as {type(probe).__name__}, but base_model has a "
                         f"{type(base).__name__} there (expected {torch_type.__name__})")
    for attr in (entry.size_attrs if entry is not None else ()):
        if hasattr(base, attr) and hasattr(probe, attr):
            mine, theirs = _comparable(getattr(probe, attr)), _comparable(getattr(base, attr))
            if isinstance(mine, (int, bool, str, tuple, type(None))) and mine != theirs:
                raise ValueError(f"{file}: module {name!r} has {attr}={mine!r} in the save, but base_model has "
                                 f"{attr}={theirs!r}")


def _comparable(value: Any) -> Any:
    """Sizes as saved in JSON (lists) and as torch holds them (tuples) compare alike."""
    return tuple(value) if isinstance(value, list) else value


def _compare(expected: Mapping[str, tuple[int, ...]], header: Mapping[str, tuple[str, tuple[int, ...]]],
             file: Path) -> None:
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    wrong = [f"{k}: file {header[k][1]} vs model {tuple(expected[k])}"
             for k in sorted(set(expected) & set(header)) if tuple(header[k][1]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing[:5]}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:5]}")
        if wrong:
            parts.append(f"shape mismatch: {wrong[:5]}")
        raise ValueError(f"{file}: weights do not match the model ({'; '.join(parts)})")


class Verified(NamedTuple):
    """A saved folder as :func:`read_verified` returns it."""

    config: dict[str, Any]
    data: bytes
    header: dict[str, tuple[str, tuple[int, ...]]]
    weights_file: Path

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights, read from ``data``."""
        return read_tensors(self.data, self.weights_file)


def read_verified(path: str | os.PathLike) -> Verified:
    """Read and check a folder written by :func:`save`, as :func:`load` does before building
    anything: the config's fields, the weights file's SHA-256 against the one the config records,
    and the safetensors header's layout. Returns (config, the weights file's bytes, its header:
    name -> (dtype, shape), the weights file's path); any damage (a missing, truncated or altered
    file) is a ValueError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; expected one written by mpolstm.save "
                         f"(holding {WEIGHTS_FILE} and {CONFIG_FILE})")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    config = read_config(config_file)
    if not weights_file.is_file():
        raise ValueError(f"{weights_file}: missing")
    data = weights_file.read_bytes()
    if hashlib.sha256(data).hexdigest() != config["weights_sha256"]:
        raise ValueError(f"{weights_file}: content does not match the SHA-256 recorded in {config_file}; "
                         "the file is corrupt, truncated or from another save")
    return Verified(config, data, read_header(data, weights_file).tensors, weights_file)


def load(path: str | os.PathLike, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild what ``save`` wrote in the directory ``path``.

    Standalone MPO module: returned fully rebuilt (dtype as saved, on CPU). Compressed
    model: pass ``base_model``, a freshly built model with the original architecture; its
    listed modules are replaced by MPO modules (dtype and device of the module they
    replace) and the whole state_dict is loaded strictly into it; it is returned.
    Raises ValueError naming the file and the mismatch for anything that does not fit."""
    saved = read_verified(path)
    config, config_file = saved.config, Path(path) / CONFIG_FILE
    if config["standalone"]:
        if base_model is not None:
            raise ValueError(f"{config_file}: holds a standalone {config['model_class']}; call load without base_model")
        return _load_standalone(saved, config_file)
    if base_model is None:
        raise ValueError(f"{config_file}: holds a compressed {config['model_class']}; pass base_model=<a freshly "
                         "built model of that architecture> to load it")
    if not isinstance(base_model, nn.Module):
        raise ValueError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
    if type(base_model).__name__ != config["model_class"]:
        raise ValueError(f"{config_file}: saved from a {config['model_class']}, but base_model is a "
                         f"{type(base_model).__name__}")
    plan = _plan_modules(saved, base_model, config_file)
    built = []
    for name, cls, entry, base in plan:
        like = next(iter(base.parameters()), None)
        module = _build(cls, entry["config"], config_file, name, "cpu")
        if like is not None:
            module = module.to(device=like.device, dtype=like.dtype)
        module.train(base.training)
        replace_module(base_model, name, module)
        built.append((name, module))
    for layer in base_model.modules():  # layers using another layer's MPO (tied weights)
        if isinstance(layer, SharedLayer):
            try:
                layer.bind(base_model)
            except AttributeError:
                raise ValueError(f"{config_file}: a shared layer's owner {layer.owner_name!r} is not in the "
                                 "model") from None
    base_model.load_state_dict(_restore(saved.data, saved.weights_file, built), strict=True)
    for name, module in built:
        _restore_errors(module, config["modules"][name])
    return base_model


def _restore_errors(module: MPOModule, entry: Mapping[str, Any]) -> None:
    """The errors recorded when the MPOs were made, back in ``module.reports`` (so that a model loaded,
    quantized and saved again keeps them)."""
    for weight, error in (entry.get("errors") or {}).items():
        if isinstance(error, (int, float)) and weight in module.mpo_weights():
            module.reports[weight] = TruncationReport(float(error), None, None)


def _load_standalone(saved: Verified, config_file: Path) -> nn.Module:
    """The MPO module a standalone save holds, rebuilt (dtype as saved, on CPU)."""
    entry = saved.config["modules"][""]
    cls = _mpo_class(entry["config"].get("class"), config_file, "")
    probe = _build(cls, entry["config"], config_file, "", "meta")
    _compare({k: v.shape for k, v in probe.state_dict().items()}, saved.header, saved.weights_file)
    _check_dtypes(_floating("", probe), _int8_keys("", probe), saved.header, saved.weights_file)
    module = _build(cls, entry["config"], config_file, "", "cpu").to(_DTYPES[entry["dtype"]])
    module.load_state_dict(_restore(saved.data, saved.weights_file, [("", module)]), strict=True)
    _restore_errors(module, entry)
    return module


def _plan_modules(saved: Verified, base_model: nn.Module, config_file: Path) -> list[tuple]:
    """(name, MPO class, saved entry, the base module it replaces) for every saved module, after
    checking on the meta device that the base model and the weights file fit them (nothing built)."""
    expected = {k: v.shape for k, v in base_model.state_dict().items()}
    floating, int8 = _floating("", base_model), {}
    plan = []
    for name, entry in saved.config["modules"].items():
        cls = _mpo_class(entry["config"].get("class"), config_file, name)
        try:
            base = base_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{config_file}: module {name!r} does not exist in base_model") from None
        probe = _build(cls, entry["config"], config_file, name, "meta")
        _check_base_module(base, probe, name, config_file)
        expected = {k: v for k, v in expected.items() if not k.startswith(name + ".")}
        expected.update({f"{name}.{k}": v.shape for k, v in probe.state_dict().items()})
        floating = {k for k in floating if not k.startswith(name + ".")} | _floating(name, probe)
        int8.update(_int8_keys(name, probe))
        plan.append((name, cls, entry, base))
    _compare(expected, saved.header, saved.weights_file)
    _check_dtypes(floating, int8, saved.header, saved.weights_file)
    return plan


def _floating(name: str, module: nn.Module) -> set[str]:
    """The state_dict keys (under ``name``) of ``module``'s floating-point tensors."""
    return {_prefix(name) + k for k, v in module.state_dict().items() if v.is_floating_point()}


def _int8_keys(name: str, module: nn.Module) -> dict[str, str]:
    """{core key: scales key} (under ``name``) of an int8 MPO module; {} for any other."""
    if not (isinstance(module, MPOWeights) and module.int8):
        return {}
    return {_prefix(name) + core: _prefix(name) + scales for core, scales in module._int8_keys().items()}


def _check_dtypes(floating: set[str], int8: Mapping[str, str], header: Mapping[str, tuple[str, Any]],
                  file: Path) -> None:
    """The cores of int8 modules must be I8 with F32 scales; every other float entry a float tensor."""
    scales = set(int8.values())
    for key, (dtype, _) in header.items():
        if key in int8 and dtype != "I8":
            raise ValueError(f"{file}: tensor {key!r} is {dtype}, but its module is saved with int8 cores "
                             "(expected I8)")
        if key in scales and dtype != "F32":
            raise ValueError(f"{file}: tensor {key!r} is {dtype}; the scales of int8 cores are F32")
        if key not in int8 and key in floating and dtype not in ("F64", "F32", "F16", "BF16"):
            raise ValueError(f"{file}: tensor {key!r} is {dtype} where a float tensor is expected (its module's "
                             "config does not mark it int8)")


def _restore(data: bytes, file: Path, modules: Sequence[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """The file's tensors with every int8 core of ``modules`` dequantized (:func:`dequantize_cores`)."""
    return dequantize_cores(read_tensors(data, file), modules, file)


def dequantize_cores(tensors: Mapping[str, torch.Tensor], modules: Sequence[tuple[str, nn.Module]],
                     file: Path) -> dict[str, torch.Tensor]:
    """A copy of a saved file's ``tensors`` with the int8 cores of the named ``modules`` (built from
    the file's config) dequantized, in the dtype of each module's core, by their scales; a scale
    that is not finite and positive is a ValueError naming ``file`` and the tensor."""
    tensors = dict(tensors)
    for name, module in modules:
        for core, scales in _int8_keys(name, module).items():
            scale = tensors[scales]
            if not bool((torch.isfinite(scale) & (scale > 0)).all()):
                raise ValueError(f"{file}: tensor {scales!r} holds a non-finite, zero or negative scale; the "
                                 f"int8 core {core!r} cannot be restored (corrupt, or not written by mpolstm.save)")
            dtype = module.get_parameter(core.removeprefix(_prefix(name))).dtype
            tensors[core] = dequantize_int8(tensors[core], scale, dtype)
    return tensors
