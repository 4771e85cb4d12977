"""Whole-model compression: replace the layers of every registered type (nn.Linear, nn.Embedding,
nn.LSTM / GRU / RNN and their cells, nn.Conv1d / Conv2d; ``mpolstm.nn.registry``) by MPO layers.

    model, report = compress(model, CompressionConfig(target_ratio=20), calibration=batches)
    print(report)
    freeze_central(model)            # MPOP lightweight fine-tuning
    print_trainable_parameters(model)

Modules are replaced in place (like PEFT and torch.nn.utils.prune), through the layer
registry (mpolstm.nn.registry) only.

config        CompressionConfig and module selection (a bad field is a ConfigError naming it)
fit           Fit: one weight as compressed, in any layout (MPO + optional sparse part)
layouts       the layout table, Target, candidates and their (whitened) decomposition
hybrid        the "lowrank+sparse" fitter
sizing        fits under budgets (allocation) or bounds
output_aware  the held-out decision between allocations (paired test on held-out calibration batches)
checks        the model's output error against the original (OutputCheck), synthetic inputs
tolerance     max_output_error / evaluate + max_drop: the smallest model within a tolerance
refit         refit=True: each fit refitted to the compressed upstream's inputs
engine        compress() and freeze_central()
report        CompressionReport
"""

from ..errors import ConfigError
from ..mpo import central_core
from ..nn.registry import is_mpo_module
from .config import CompressionConfig
from .engine import compress, freeze_central
from .layouts import LAYOUTS
from .report import CompressionReport, ModuleReport, WeightReport, print_trainable_parameters

__all__ = [
    "LAYOUTS",
    "CompressionConfig",
    "CompressionReport",
    "ConfigError",
    "ModuleReport",
    "WeightReport",
    "central_core",
    "compress",
    "freeze_central",
    "is_mpo_module",
    "print_trainable_parameters",
]
