"""nn.Module layers whose weights are Matrix Product Operators."""

from .linear import MPOLinear

__all__ = ["MPOLinear"]
