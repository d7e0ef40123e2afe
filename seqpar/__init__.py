"""seqpar: exact softmax attention over sequences sharded across devices (Ring / Striped / Zigzag)."""

from seqpar.attention import attention
from seqpar.batch import shard_batch
from seqpar.comm_mpi import MPIGroup, mpi_group
from seqpar.distributed import init_distributed, init_mesh
from seqpar.layout import LAYOUTS, LayoutKind
from seqpar.parallelize import parallelize
from seqpar.sharding import positions, shard, unshard

__all__ = [
    "attention",
    "init_distributed",
    "init_mesh",
    "MPIGroup",
    "mpi_group",
    "shard",
    "unshard",
    "positions",
    "parallelize",
    "shard_batch",
    "LAYOUTS",
    "LayoutKind",
]

__version__ = "0.1.0"
