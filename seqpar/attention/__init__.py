"""The distributed attention algorithms (autograd functions over ``seqpar.comm`` and ``seqpar.kernels``)."""

from seqpar.attention.api import METHODS, Method, attention
from seqpar.attention.ring import RingAttention, ring_backward, ring_forward

__all__ = ["attention", "Method", "METHODS", "RingAttention", "ring_forward", "ring_backward"]
