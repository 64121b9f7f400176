"""Across processes and machines: expert-parallel and pipeline-parallel runs on MLX's distributed
engine (``mx.distributed``: the ring backend over TCP, or MPI), started by ``mlx.launch``.

- :mod:`~mlxtral.distributed.group`: joining the group, collectives on NumPy arrays under a
  watchdog, one line when a peer dies or hangs, ranks of one host pinned to their own cores.
- :mod:`~mlxtral.distributed.placement`: which rank holds which rows of the experts, which whole
  experts, or which layers.
- :mod:`~mlxtral.distributed.setup`: at load, the same model and settings on every rank.
- :mod:`~mlxtral.distributed.protocol`: the commands rank 0 broadcasts (one per forward).
- :mod:`~mlxtral.distributed.doorbell`: rank 0 rings before each command, so that the ranks
  waiting for one sleep instead of polling inside the collective.
- :mod:`~mlxtral.distributed.relay`: a rank that never reads stdin fills the pipe ``mlx.launch``
  would otherwise poll.
- :mod:`~mlxtral.distributed.runner`: rank 0's backend and the other ranks' loop.
- :mod:`~mlxtral.distributed.pipeline`: the pipeline forward, micro-batched.

Expert parallel lives in the backends themselves (``NumpyBackend.moe``, ``MLXBackend``'s MoE layer):
by rows, each rank computes its columns of every routed pair's activation and output and two
collectives per layer put them together (an ``all_gather`` of each rank's columns); by whole
experts, each rank computes its experts' (token, rank) slots and one ``all_sum`` per layer completes
them. Either way every number is computed as in one process, so the result is the single process's
bit for bit; on NumPy each rank also projects its slice of the vocabulary.
"""
from mlxtral.distributed.placement import MODES

__all__ = ["MODES"]
