"""seqpar: exact softmax attention over sequences sharded across devices (Ring / Striped / Zigzag)."""

from seqpar.api import attention, auto_method, set_machine
from seqpar.batch import shard_batch
from seqpar.comm.mpi import MPIGroup, mpi_group
from seqpar.launcher import init_distributed
from seqpar.mesh import init_mesh
from seqpar.parallel import parallelize
from seqpar.sharding import positions, shard, unshard
from seqpar.vocab import BACKENDS, LAYOUTS, METHODS, Layout

LayoutKind = Layout  # the name of earlier releases

__all__ = [
    "attention",
    "auto_method",
    "set_machine",
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
    "METHODS",
    "BACKENDS",
    "Layout",
    "LayoutKind",
]

__version__ = "0.1.0"
