"""mpolstm: compress LSTM networks with Matrix Product Operators."""

__version__ = "0.1.0"
