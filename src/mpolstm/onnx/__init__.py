"""ONNX in, ONNX out: compress a recurrent model you only have as an ONNX file.

    model = mpolstm.onnx.load("model.onnx")            # an nn.Module: LSTM/GRU/Linear/Conv are torch layers
    mpolstm.compress(model, CompressionConfig(target_ratio=10), calibration=[inputs])
    mpolstm.onnx.save(model, "small.onnx")              # the original's inputs and outputs, layers factorized
"""

from .model import OnnxModel, load
from .writer import save

__all__ = ["OnnxModel", "load", "save"]
