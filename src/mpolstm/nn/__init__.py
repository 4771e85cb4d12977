"""nn.Module layers whose weights are Matrix Product Operators.

Every layer here follows the MPO-module protocol in docs/architecture.md (mpo_weights,
reports, mpo_config/from_config, from_<torch>(..., mpos=...), to_<torch>), which
compress.py and io.py rely on. Read it before adding a layer.
"""

from .embedding import MPOEmbedding
from .linear import MPOLinear
from .rnn import MPOGRU, MPOLSTM

__all__ = ["MPOEmbedding", "MPOLinear", "MPOLSTM", "MPOGRU"]
