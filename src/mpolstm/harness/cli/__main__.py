"""``python -m mpolstm.harness.cli`` (and ``torchrun -m mpolstm.harness.cli``): the ``mpolstm`` command."""

from . import main

main()
