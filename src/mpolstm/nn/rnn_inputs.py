"""What each weight of a torch recurrent layer multiplies: the registry's ``inputs`` hook of nn.LSTM,
nn.GRU and nn.RNN (calibration records the second moments of these vectors)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = ["recurrent_inputs"]

_TORCH_TYPES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


def recurrent_inputs(rnn: nn.RNNBase, args: tuple) -> Iterator[tuple[str, Tensor]]:
    """(weight name, the vectors it multiplies (samples, features)) for every layer and
    direction of an nn.LSTM / nn.GRU / nn.RNN called with ``args`` (the registry's ``inputs`` hook).

    W_ih of layer l multiplies x_t of layer l (the module input for l = 0, the previous
    layer's output otherwise) and W_hh multiplies h_{t-1} (the initial state at t = 0). The
    input is re-run one layer and direction at a time with the module's own weights to read
    those sequences (padded positions of a PackedSequence are left out). W_hr (proj_size > 0)
    is not recorded."""
    x, hx = args[0], args[1] if len(args) > 1 else None
    mask = None
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x, batch_first=True)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # (N, T)
    elif x.dim() == 2:  # unbatched (T, F)
        x = x.unsqueeze(0)
    elif not rnn.batch_first:
        x = x.transpose(0, 1)
    lstm = rnn.mode == "LSTM"
    h0_all, c0_all = hx if lstm and hx is not None else (hx, None)
    if h0_all is not None and h0_all.dim() == 2:
        h0_all, c0_all = h0_all.unsqueeze(1), None if c0_all is None else c0_all.unsqueeze(1)
    directions = 2 if rnn.bidirectional else 1
    real_hidden = rnn.proj_size or rnn.hidden_size
    layer_input = x  # (N, T, F), batch first from here on
    for layer in range(rnn.num_layers):
        outputs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            single = _single_layer(rnn, layer_input.shape[-1])
            single.to(device=layer_input.device, dtype=layer_input.dtype)
            with torch.no_grad():
                for name in single._flat_weights_names:
                    getattr(single, name).copy_(getattr(rnn, name.replace("_l0", sfx)))
            seq = layer_input.flip(1) if d else layer_input
            k = layer * directions + d
            h0 = None if h0_all is None else h0_all[k : k + 1]
            c0 = None if c0_all is None else c0_all[k : k + 1]  # set with h0 for an LSTM
            state = h0 if h0 is None or not lstm else (h0, c0)
            if d and mask is not None:  # reverse each sequence within its own length
                seq = torch.stack([torch.cat([s[:n].flip(0), s[n:]]) for s, n in
                                   zip(layer_input, mask.sum(1))])
            with torch.no_grad():
                out, _ = single(seq, state)
            start = torch.zeros_like(out[:, :1]) if h0 is None else h0.transpose(0, 1)
            previous = torch.cat([start, out[:, :-1]], 1)  # h_{t-1}
            keep = mask if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool)
            yield f"weight_ih{sfx}", seq[keep]
            yield f"weight_hh{sfx}", previous[keep]
            if d and mask is not None:
                out = torch.stack([torch.cat([o[:n].flip(0), o[n:]]) for o, n in zip(out, mask.sum(1))])
            elif d:
                out = out.flip(1)
            outputs.append(out[..., :real_hidden])
        layer_input = torch.cat(outputs, -1)


def _single_layer(rnn: nn.RNNBase, input_size: int) -> nn.RNNBase:
    """A one-layer, one-direction, batch-first torch RNN of ``rnn``'s kind (LSTM, GRU, RNN), with
    uninitialised weights (the caller copies them in: a random init cost a third of recording the
    moments of a 3-layer bidirectional LSTM)."""
    kwargs: dict[str, Any] = {"bias": rnn.bias, "batch_first": True}
    if rnn.mode == "LSTM":
        kwargs["proj_size"] = rnn.proj_size
    elif rnn.mode.startswith("RNN_"):
        kwargs["nonlinearity"] = "tanh" if rnn.mode == "RNN_TANH" else "relu"
    return _TORCH_TYPES[rnn.mode](input_size, rnn.hidden_size, 1, device="meta", **kwargs).to_empty(device="cpu")
