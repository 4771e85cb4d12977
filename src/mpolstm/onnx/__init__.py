"""ONNX in, ONNX out: compress a recurrent model you only have as an ONNX file.

    model = mpolstm.onnx.load("model.onnx")            # an nn.Module: LSTM/GRU/Linear/Conv are torch layers
    mpolstm.compress(model, CompressionConfig(target_modules=mpolstm.onnx.recurrent_layers(model),
                     target_ratio=10), calibration=[inputs])
    mpolstm.onnx.save(model, "small.onnx")              # the original's inputs and outputs, layers factorized
    mpolstm.onnx.save(model, "small.step.onnx", step=True, int8=True)   # one frame a call, states in and out

``compress_file`` does load, compress, distil and save in one call (``mpolstm compress model.onnx
out.onnx``). ``onnx`` (and, to check and quantize what is written, ``onnxruntime``) are imported
inside the functions: ``pip install 'mpolstm[export]'``.

Recurrent, linear and convolution nodes become torch layers (``layers.py``); every other node runs
in a small interpreter written here (``ops.py``, ``shapes.py``, ``indexing.py``; control flow in
``control.py``; docs/onnx.md lists its operators with ONNX's conformance cases) rather than through onnx2torch,
whose newest release (1.5.15) has no LSTM or GRU converter and imports torchvision, which does not
install beside the torch this library supports; the writer changes only the layers' nodes of the
original graph, so names, shapes and everything else stay as they were (docs/architecture.md).
"""

from .model import OnnxModel, load
from .pipeline import as_batches, compress_file, recurrent_layers
from .writer import dynamic_int8, save, to_bytes

__all__ = ["OnnxModel", "as_batches", "compress_file", "dynamic_int8", "load", "recurrent_layers", "save", "to_bytes"]
