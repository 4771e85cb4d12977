"""nn.Module layers whose weights are Matrix Product Operators, and their registry.

Every layer here follows the MPO-module protocol in docs/architecture.md (mpo_weights,
reports, mpo_config/from_config, from_<torch>(..., mpos=...), to_<torch>) and registers its
torch <-> MPO correspondence once in ``registry``; compress, io, export and prune rely on
nothing else. Read it before adding a layer.
"""

from .embedding import MPOEmbedding
from .linear import MPOLinear, init_cores_
from .registry import LayerType, is_mpo_module, layer_type, register, replace_module
from .rnn import MPOGRU, MPOLSTM, MPORNN
from .cells import MPOGRUCell, MPOLSTMCell, MPORNNCell
from .conv import MPOConv1d, MPOConv2d
from .shared import SharedEmbedding, SharedLinear

__all__ = ["MPOEmbedding", "MPOLinear", "MPOLSTM", "MPOGRU", "MPORNN", "MPOLSTMCell", "MPOGRUCell", "MPORNNCell",
           "MPOConv1d", "MPOConv2d", "LayerType", "init_cores_", "is_mpo_module", "layer_type", "register",
           "replace_module", "SharedEmbedding", "SharedLinear"]
