import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mpolstm[export]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mpolstm.onnxgraph import dedupe_tensors, run_onnxruntime  # noqa: E402


def test_dedupe_rewires_a_loop_body_that_reads_a_dropped_copy():
    """Two equal main-graph weights, the second read only inside a Loop body: one is kept, the body
    reads it (a body looked up before the main graph was rewritten would keep the dropped name)."""
    w = np.arange(16, dtype=np.float32)
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "b"], ["acc_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [16])])
    nodes = [helper.make_node("Add", ["x", "a"], ["y"]),
             helper.make_node("Loop", ["n", "", "y"], ["z"], body=body)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [16])],
                              [numpy_helper.from_array(w, "a"), numpy_helper.from_array(w.copy(), "b"),
                               numpy_helper.from_array(np.array(3, np.int64), "n")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones(16, np.float32)
    want = run_onnxruntime(model.SerializeToString(), {"x": x})
    assert dedupe_tensors(model) == w.nbytes
    onnx.checker.check_model(model)
    assert [t.name for t in model.graph.initializer if t.dims == [16]] == ["a"]
    np.testing.assert_array_equal(run_onnxruntime(model.SerializeToString(), {"x": x})[0], want[0])
    np.testing.assert_array_equal(want[0], x + 4 * w)
