"""ONNX nodes that become torch layers (so that compress, prune and distill see them), and back.

- ``LSTM`` / ``GRU`` -> ``nn.LSTM`` / ``nn.GRU`` (one layer; "bidirectional" -> bidirectional=True,
  "reverse" -> a forward layer run on the time-reversed sequence). Gates: ONNX orders them
  LSTM (i, o, f, c) and GRU (z, r, h), torch (i, f, g, o) and (r, z, n); ``B`` holds the input
  and recurrent biases one after the other. ONNX's GRU with ``linear_before_reset=1`` is torch's
  GRU; with 0 (the reset gate applied before the recurrent product) torch has no layer, so it is
  refused, as are ``clip``, non-default activations, ``input_forget``, peepholes (``P``) and
  ``sequence_lens``. ``layout`` 1 (batch first) is transposed around the layer.
- ``MatMul`` with a constant 2-D right operand (and a following ``Add`` of a constant [N] bias,
  fused) and ``Gemm`` with a constant ``B``, ``alpha = beta = 1``, ``transA = 0`` and a constant
  [N] or absent ``C`` -> ``nn.Linear``. Other MatMul / Gemm nodes stay in the interpreter.
- ``Conv`` with constant weights, 1-D or 2-D -> ``nn.Conv1d`` / ``nn.Conv2d``; asymmetric and
  ``SAME_*`` padding are applied before the layer.
- ``Einsum`` of the grouped-linear form ``...gi,gih->...gh`` (the weight's axes in any order, a
  constant weight: one linear map per group, as around the GRUs of grouped-RNN noise suppressors)
  -> a 1x1 ``nn.Conv1d`` with ``groups=G`` (compressible as any convolution). Other Einsums stay
  in the interpreter.

``run_*`` compute a node's outputs with ONNX semantics from its torch layer; they are what the
imported model runs and what the writer exports for a compressed layer. ``*_tensors`` give a dense
layer's current weights in the node's ONNX layout (to write a pruned or fine-tuned layer back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ConvSpec", "GroupedSpec", "LinearSpec", "RecurrentSpec", "conv_layer", "conv_tensors", "grouped_layer",
           "grouped_tensors", "linear_tensors", "recurrent_layer", "recurrent_tensors", "run_conv", "run_grouped",
           "run_recurrent", "step_recurrent"]

GATE_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2)}  # torch's gate k is ONNX's gate GATE_ORDER[k]
ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


@dataclass(frozen=True)
class RecurrentSpec:
    """An ONNX LSTM / GRU node: X, initial_h, initial_c names (None when absent) and Y, Y_h, Y_c."""

    mode: str
    hidden: int
    directions: int
    reverse: bool
    layout: int
    inputs: tuple[str | None, ...]
    outputs: tuple[str | None, ...]


@dataclass(frozen=True)
class LinearSpec:
    """A MatMul (+ Add) or Gemm node run as nn.Linear: ``bias_input`` names the fused bias constant."""

    weight_input: str
    transposed: bool  # the ONNX weight is (N, K) (Gemm transB=1), else (K, N)
    bias_input: str | None
    bias_shape: tuple[int, ...]


@dataclass(frozen=True)
class ConvSpec:
    """A Conv node: ``pads`` (ONNX begin..., end...) applied before the layer when not symmetric,
    or "SAME_UPPER" / "SAME_LOWER" computed per call; None when the layer pads itself."""

    pads: tuple[int, ...] | str | None
    has_bias: bool


def _effective(layer: nn.Module, name: str) -> Tensor:
    """A weight as the layer computes with it: ``orig * mask`` for a pruned one (torch.nn.utils.prune
    refreshes the plain attribute only at the next forward), else the parameter."""
    mask = getattr(layer, f"{name}_mask", None)
    return (getattr(layer, f"{name}_orig") * mask if mask is not None else getattr(layer, name)).detach()


def _permute_gates(w: Tensor, mode: str, to_torch: bool) -> Tensor:
    blocks = w.chunk(len(GATE_ORDER[mode]), dim=0)
    order = GATE_ORDER[mode]
    if not to_torch:
        order = tuple(order.index(k) for k in range(len(order)))
    return torch.cat([blocks[k] for k in order], dim=0)


def recurrent_layer(op: str, attrs: dict, consts: Callable[[str], Tensor | None], inputs: list[str],
                    outputs: list[str]) -> tuple[nn.RNNBase, RecurrentSpec]:
    """The torch layer and spec of an ONNX LSTM / GRU node; ``consts(name)`` gives a constant input or None."""
    direction = attrs.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"direction {direction!r} is not an ONNX direction")
    if op == "GRU" and attrs.get("linear_before_reset", 0) != 1:
        raise ValueError("linear_before_reset=0 (reset gate before the recurrent product) has no torch layer; "
                         "only linear_before_reset=1 (torch's GRU) is supported")
    if "clip" in attrs or "activation_alpha" in attrs or "activation_beta" in attrs or attrs.get("input_forget", 0):
        raise ValueError("clip, activation_alpha/beta and input_forget are not supported")
    if [a.lower() for a in attrs.get("activations", ACTIVATIONS[op] * dirs)] != \
            [a.lower() for a in ACTIVATIONS[op] * dirs]:
        raise ValueError(f"activations {attrs['activations']} are not supported (only {ACTIVATIONS[op]})")
    slots = inputs + [""] * (8 - len(inputs))
    if slots[4]:
        raise ValueError("sequence_lens is not supported (every sequence runs to the full length)")
    if op == "LSTM" and slots[7]:
        raise ValueError("peepholes (input P) are not supported")
    w, r = consts(slots[1]), consts(slots[2])
    b = consts(slots[3]) if slots[3] else None
    if w is None or r is None or (slots[3] and b is None):
        raise ValueError("W, R and B must be constant initializers to become a torch layer")
    gates = len(GATE_ORDER[op])
    hidden = attrs.get("hidden_size", r.shape[-1])
    if w.dim() != 3 or w.shape[:2] != (dirs, gates * hidden) or r.shape != (dirs, gates * hidden, hidden) or \
            (b is not None and b.shape != (dirs, 2 * gates * hidden)):
        raise ValueError(f"weights W {tuple(w.shape)}, R {tuple(r.shape)} do not fit {dirs} direction(s) of "
                         f"hidden size {hidden}")
    layer = getattr(nn, op)(w.shape[2], hidden, bias=b is not None, bidirectional=dirs == 2, dtype=w.dtype)
    with torch.no_grad():
        for d in range(dirs):
            sfx = "_l0" + ("_reverse" if d else "")
            getattr(layer, f"weight_ih{sfx}").copy_(_permute_gates(w[d], op, True))
            getattr(layer, f"weight_hh{sfx}").copy_(_permute_gates(r[d], op, True))
            if b is not None:
                getattr(layer, f"bias_ih{sfx}").copy_(_permute_gates(b[d, :gates * hidden], op, True))
                getattr(layer, f"bias_hh{sfx}").copy_(_permute_gates(b[d, gates * hidden:], op, True))
    names = (slots[0], slots[5], slots[6] if op == "LSTM" else "")
    outs = list(outputs) + [""] * (3 - len(outputs))
    spec = RecurrentSpec(op, hidden, dirs, direction == "reverse", attrs.get("layout", 0),
                         tuple(n or None for n in names), tuple(n or None for n in outs[:3]))
    return layer.eval(), spec


def recurrent_tensors(layer: nn.Module, spec: RecurrentSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """(W, R, B) of a dense torch LSTM / GRU in the node's ONNX layout (B None without biases)."""
    ws, rs, bs = [], [], []
    for d in range(spec.directions):
        sfx = "_l0" + ("_reverse" if d else "")
        ws.append(_permute_gates(_effective(layer, f"weight_ih{sfx}"), spec.mode, False))
        rs.append(_permute_gates(_effective(layer, f"weight_hh{sfx}"), spec.mode, False))
        if layer.bias:
            bs.append(torch.cat([_permute_gates(getattr(layer, f"{k}{sfx}").detach(), spec.mode, False)
                                 for k in ("bias_ih", "bias_hh")]))
    return torch.stack(ws), torch.stack(rs), torch.stack(bs) if bs else None


def run_recurrent(layer: nn.Module, spec: RecurrentSpec, x: Tensor, h0: Tensor | None = None,
                  c0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(Y, Y_h, Y_c) of the ONNX node: Y (T, D, N, H) (layout 1: (N, T, D, H)), Y_h and Y_c
    (D, N, H) (layout 1: (N, D, H)); Y_c is None for a GRU."""
    if spec.layout == 1:
        x = x.transpose(0, 1)
        h0, c0 = (None if s is None else s.transpose(0, 1) for s in (h0, c0))
    x = x.flip(0) if spec.reverse else x
    state = h0
    if spec.mode == "LSTM" and (h0 is not None or c0 is not None):
        zeros = x.new_zeros(spec.directions, x.shape[1], spec.hidden)
        state = (zeros if h0 is None else h0, zeros if c0 is None else c0)
    out, new = layer(x, state)
    h_n, c_n = new if spec.mode == "LSTM" else (new, None)
    out = out.flip(0) if spec.reverse else out
    y = out.reshape(out.shape[0], out.shape[1], spec.directions, spec.hidden).transpose(1, 2)
    if spec.layout == 1:
        y, h_n = y.permute(2, 0, 1, 3), h_n.transpose(0, 1)
        c_n = None if c_n is None else c_n.transpose(0, 1)
    return y, h_n, c_n


def step_recurrent(layer: nn.Module, spec: RecurrentSpec, x: Tensor, state) -> tuple[Tensor, object]:
    """One frame of a forward ONNX LSTM / GRU through ``layer.step`` (an MPO layer): ``x`` (1, N, I)
    (layout 1: (N, 1, I)), ``state`` h or (h, c) as the node's initial states (None: zeros).
    Returns (Y, new state) in the node's layouts."""
    frame = x[0] if spec.layout == 0 else x[:, 0]
    if state is not None and spec.layout == 1:
        state = tuple(s.transpose(0, 1) for s in state) if isinstance(state, tuple) else state.transpose(0, 1)
    out, new = layer.step(frame, state)
    y = out[None, None] if spec.layout == 0 else out[:, None, None]
    if spec.layout == 1:
        new = tuple(s.transpose(0, 1) for s in new) if isinstance(new, tuple) else new.transpose(0, 1)
    return y, new


def linear_tensors(layer: nn.Linear, spec: LinearSpec) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a dense nn.Linear in the node's ONNX layout."""
    weight = _effective(layer, "weight")
    bias = None if layer.bias is None else layer.bias.detach().reshape(spec.bias_shape)
    return (weight if spec.transposed else weight.T.contiguous()), bias


def conv_layer(attrs: dict, weight: Tensor, bias: Tensor | None) -> tuple[nn.Module, ConvSpec]:
    """The nn.Conv1d / nn.Conv2d and spec of an ONNX Conv node with constant weights."""
    spatial = weight.dim() - 2
    if spatial not in (1, 2):
        raise ValueError(f"only 1-D and 2-D convolutions become torch layers, this one is {spatial}-D")
    if list(attrs.get("kernel_shape", weight.shape[2:])) != list(weight.shape[2:]):
        raise ValueError(f"kernel_shape {attrs['kernel_shape']} does not match the weight {tuple(weight.shape)}")
    pads = tuple(attrs.get("pads", (0,) * 2 * spatial))
    auto = attrs.get("auto_pad", "NOTSET")
    symmetric = auto in ("NOTSET", "VALID") and pads[:spatial] == pads[spatial:]
    padding = pads[:spatial] if symmetric and auto == "NOTSET" else (0,) * spatial
    cls = nn.Conv1d if spatial == 1 else nn.Conv2d
    groups = attrs.get("group", 1)
    layer = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                stride=tuple(attrs.get("strides", (1,) * spatial)), padding=padding,
                dilation=tuple(attrs.get("dilations", (1,) * spatial)), groups=groups, bias=bias is not None,
                dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    extra = None if symmetric else auto if auto.startswith("SAME") else pads
    return layer.eval(), ConvSpec(extra, bias is not None)


def _same_pads(x: Tensor, layer: nn.Module, upper: bool) -> list[int]:
    """torch's F.pad list (last axis first) for auto_pad SAME_UPPER / SAME_LOWER."""
    out = []
    for size, k, s, d in reversed(list(zip(x.shape[2:], layer.kernel_size, layer.stride, layer.dilation))):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        out += [small, total - small] if upper else [total - small, small]
    return out


def run_conv(layer: nn.Module, spec: ConvSpec, x: Tensor) -> Tensor:
    """The ONNX Conv node's output from its torch layer."""
    if isinstance(spec.pads, str):
        x = F.pad(x, _same_pads(x, layer, spec.pads == "SAME_UPPER"))
    elif spec.pads is not None:
        half = len(spec.pads) // 2
        x = F.pad(x, [p for axis in reversed(range(half)) for p in (spec.pads[axis], spec.pads[axis + half])])
    return layer(x)


def conv_tensors(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W, B) of a dense torch convolution in ONNX's layout (the same as torch's)."""
    return _effective(layer, "weight"), None if layer.bias is None else layer.bias.detach()


@dataclass(frozen=True)
class GroupedSpec:
    """An Einsum of the grouped-linear form ``...gi,<g i h in any order>->...gh`` (a constant weight
    W: one (I, H) matrix per group g) run as a 1x1 grouped nn.Conv1d: ``order`` is the weight's
    axes as positions of (g, i, h)."""

    order: tuple[int, int, int]


def grouped_layer(equation: str, weight: Tensor) -> tuple[nn.Conv1d, GroupedSpec] | None:
    """The Conv1d(G I, G H, 1, groups=G) of a grouped-linear Einsum, or None for another equation."""
    terms = equation.replace(" ", "").split("->")
    inputs = terms[0].split(",") if len(terms) == 2 else []
    if len(inputs) != 2 or "." in terms[0] or weight.dim() != 3 or not weight.is_floating_point():
        return None
    x, w, out = inputs[0], inputs[1], terms[1]
    if len(x) < 2 or len(set(x)) != len(x) or sorted(w) != sorted(set(w)) or len(w) != 3:
        return None
    g, i = x[-2], x[-1]
    h = next(iter(set(w) - {g, i}), None)
    if h is None or set(w) != {g, i, h} or h in x or out != x[:-1] + h:
        return None
    order = tuple("gih".index(dict(zip((g, i, h), "gih"))[c]) for c in w)
    canonical = weight.permute(*[order.index(k) for k in range(3)])  # (G, I, H)
    groups, fan_in, fan_out = canonical.shape
    layer = nn.Conv1d(groups * fan_in, groups * fan_out, 1, groups=groups, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(canonical.transpose(1, 2).reshape(groups * fan_out, fan_in, 1))
    return layer.eval(), GroupedSpec(order)


def run_grouped(layer: nn.Module, x: Tensor) -> Tensor:
    """The Einsum's output (..., G, H) from its grouped convolution; ``x`` (..., G, I)."""
    lead = x.shape[:-2]
    y = layer(x.reshape(-1, x.shape[-2] * x.shape[-1], 1))
    return y.reshape(*lead, layer.groups, -1)


def grouped_tensors(layer: nn.Module, spec: GroupedSpec) -> Tensor:
    """The dense grouped convolution's weight in the Einsum's layout."""
    kernel = _effective(layer, "weight")
    canonical = kernel.reshape(layer.groups, -1, kernel.shape[1]).transpose(1, 2)  # (G, I, H)
    return canonical.permute(*spec.order).contiguous()
