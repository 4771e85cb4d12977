"""nn.Module layers whose weights are Matrix Product Operators, and their registry.

Every layer here follows the MPO-module protocol in docs/architecture.md (mpo_weights,
reports, mpo_config/from_config, from_<torch>(..., mpos=...), to_<torch>) and registers its
torch <-> MPO correspondence once in ``registry``; compress, io, export and prune rely on
nothing else. Read it before adding a layer.
"""

# the import order is the registration order, which error messages list the types in
from .linear import MPOLinear  # isort: skip
from .embedding import MPOEmbedding  # isort: skip
from .rnn import MPOGRU, MPOLSTM, MPORNN  # isort: skip
from .cells import MPOGRUCell, MPOLSTMCell, MPORNNCell  # isort: skip
from .conv import MPOConv1d, MPOConv2d  # isort: skip
from ..mpo import init_cores_
from .base import MPOWeights
from .registry import LayerType, MPOModule, is_mpo_module, layer_type, register, replace_module
from .shared import SharedEmbedding, SharedLinear

__all__ = ["MPOEmbedding", "MPOLinear", "MPOLSTM", "MPOGRU", "MPORNN", "MPOLSTMCell", "MPOGRUCell", "MPORNNCell",
           "MPOConv1d", "MPOConv2d", "MPOModule", "MPOWeights", "LayerType", "init_cores_", "is_mpo_module", "layer_type",
           "register", "replace_module", "SharedEmbedding", "SharedLinear"]
