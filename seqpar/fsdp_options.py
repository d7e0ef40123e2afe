"""FSDP2's memory options as ``parallelize`` modes: compute precision, resharding, CPU offload.

``seqpar.parallelize(model, mesh, precision=..., reshard=..., fsdp_offload=...)`` builds one
:class:`FSDPOptions`; :mod:`seqpar.passes.data_parallel` turns it into FSDP2's ``MixedPrecisionPolicy``,
``reshard_after_forward`` and ``CPUOffloadPolicy``, and :mod:`seqpar.plan` can count what each mode
holds per rank (:meth:`FSDPOptions.state_bytes`). Pure data: no torch import, validated on construction.

    precision     "fp32": no MixedPrecisionPolicy, FSDP gathers, computes and reduces in the parameters'
                  own dtype (fp32 for an fp32 model). "bf16" / "fp16": parameters all-gathered and
                  computed in that dtype (activations too), gradients reduce-scattered in fp32, the
                  sharded parameters (what the optimizer steps) stay fp32. Outputs keep the compute
                  dtype (FSDP's default output_dtype=None); floating inputs of every sharded module are
                  cast to it (cast_forward_inputs=True).
    reshard       "after_forward": every block frees its gathered parameters after its forward and
                  all-gathers them again in the backward. "keep": gathered parameters stay from a
                  block's forward to its backward (one all-gather per block per step, not two). The root
                  module (embeddings, final norm, head) keeps its parameters in both modes, FSDP's
                  default for the root: the backward starts with it.
    fsdp_offload  "none" | "cpu": FSDP's CPUOffloadPolicy, the sharded parameters, their gradients and
                  so the optimizer state live in host memory (pinned on accelerators); every all-gather
                  copies the shard to the device first, every reduce-scatter copies the result back, and
                  the optimizer step runs on the CPU. On CPU ranks it runs FSDP's offload code path
                  with unpinned memory (pinning needs an accelerator) and places nothing differently.

Gradient semantics are the same in every mode: summed over cp, averaged over dp, SUM reduce-scatter
then divide by dp (in the reduce dtype, fp32 under "bf16" / "fp16"; passes/data_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "Precision",
    "PRECISIONS",
    "Reshard",
    "RESHARDS",
    "FSDPOffload",
    "FSDP_OFFLOADS",
    "FSDPOptions",
    "DTYPE_BYTES",
]

Precision = Literal["fp32", "bf16", "fp16"]  # the dtype FSDP casts parameters to for compute ("fp32": none)
PRECISIONS: tuple[str, ...] = get_args(Precision)
Reshard = Literal["after_forward", "keep"]  # FSDP2's reshard_after_forward True / False (blocks)
RESHARDS: tuple[str, ...] = get_args(Reshard)
FSDPOffload = Literal["none", "cpu"]  # FSDP2's CPUOffloadPolicy (parameters, gradients, optimizer state)
FSDP_OFFLOADS: tuple[str, ...] = get_args(FSDPOffload)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

_HINTS = {  # what a user who passed a bool or a torch.dtype meant
    "precision": "a string naming the compute dtype, e.g. precision='bf16' for torch.bfloat16",
    "reshard": "a mode, not a bool: reshard_after_forward=True is reshard='after_forward', False is 'keep'",
    "fsdp_offload": "a mode, not a bool or a policy: CPUOffloadPolicy() is fsdp_offload='cpu'",
}


def _check_mode(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices} ({_HINTS[name]}), got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class FSDPOptions:
    """FSDP2's memory options of one ``parallelize`` call (the argument names of ``parallelize``)."""

    precision: Precision = "fp32"
    reshard: Reshard = "after_forward"
    fsdp_offload: FSDPOffload = "none"

    def __post_init__(self) -> None:
        _check_mode("precision", self.precision, PRECISIONS)
        _check_mode("reshard", self.reshard, RESHARDS)
        _check_mode("fsdp_offload", self.fsdp_offload, FSDP_OFFLOADS)

    @property
    def mixed(self) -> bool:
        """Parameters are cast for compute (a MixedPrecisionPolicy with an fp32 reduce dtype)."""
        return self.precision != "fp32"

    def non_defaults(self) -> list[str]:
        """``name=value`` of every option that differs from the default (each needs ``fsdp=True``)."""
        default = FSDPOptions()
        return [f"{n}={getattr(self, n)!r}" for n in ("precision", "reshard", "fsdp_offload")
                if getattr(self, n) != getattr(default, n)]

    def state_bytes(self, *, params: int, ranks: int, largest_block: int, root: int, param_bytes: int = 4,
                    optimizer_bytes: int = 8) -> dict[str, int]:
        """Bytes per rank of parameters, gradients, optimizer state and FSDP's transient buffers.

        ``params``: parameter count of the model; ``ranks``: FSDP's world (dp x cp); ``largest_block``:
        parameter count of the largest block (one ``fully_shard`` unit); ``root``: parameters the root unit
        owns (embeddings, final norm, head); ``param_bytes``: the parameters' own dtype (4: fp32);
        ``optimizer_bytes``: optimizer state per parameter (8: Adam's two fp32 moments). Returns
        ``device`` (the peak of accelerator bytes), ``host`` (bytes moved to host memory) and the parts:
        ``params`` / ``grads`` / ``optimizer`` (sharded, 1/ranks each, on the host under "cpu"),
        ``gathered`` (unsharded parameters in compute dtype at their peak: the root's, plus two blocks
        with "after_forward" (the running one and the prefetched next; the backward likewise), all
        of them at the forward/backward turn with "keep"), ``reduce`` (one block's unsharded gradient in
        compute dtype plus the flat reduce-scatter input it is copied into, in the reduce dtype) and ``staging``
        (under "cpu": one block's shard copied to the device for its all-gather).
        """
        compute = DTYPE_BYTES[self.precision] if self.mixed else param_bytes
        reduce = 4 if self.mixed else param_bytes
        shard = -(-params // ranks)
        sharded = dict(params=shard * param_bytes, grads=shard * param_bytes, optimizer=shard * optimizer_bytes)
        blocks = params - root
        held = root + (blocks if self.reshard == "keep" else min(2 * largest_block, blocks))
        out = dict(sharded, gathered=held * compute,
                   reduce=largest_block * (compute + reduce),
                   staging=-(-largest_block // ranks) * param_bytes if self.fsdp_offload == "cpu" else 0)
        host = sum(sharded.values()) if self.fsdp_offload == "cpu" else 0
        out["host"] = host
        out["device"] = sum(sharded.values()) - host + out["gathered"] + out["reduce"] + out["staging"]
        return out
