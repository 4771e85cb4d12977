"""ONNX in, ONNX out: compress a recurrent model you only have as an ONNX file.

    model = mpolstm.onnx.load("model.onnx")            # an nn.Module: LSTM/GRU/Linear/Conv are torch layers
    mpolstm.compress(model, CompressionConfig(target_ratio=10), calibration=[inputs])
    mpolstm.onnx.save(model, "small.onnx")              # the original's inputs and outputs, layers factorized
"""

from .model import OnnxModel, load
from .pipeline import as_batches, compress_file, recurrent_layers
from .writer import dynamic_int8, save, to_bytes

__all__ = ["OnnxModel", "as_batches", "compress_file", "dynamic_int8", "load", "recurrent_layers", "save", "to_bytes"]
