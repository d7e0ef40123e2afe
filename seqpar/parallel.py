"""``seqpar.parallelize``: make an existing model train on sequences sharded over ``mesh["cp"]``.

The orchestrator: the model code stays free of parallelism; ``parallelize`` applies the passes of
:mod:`seqpar.passes` to it, in place, in this order (each pass only relies on the ones before it)::

    0. check      mesh has a "cp" dim, options are known, the model has attention seqpar can take
                  over; what seqpar cannot make global is refused by name (MoE router losses it cannot
                  reproduce, modules that number positions from the local length): ValueError /
                  TypeError before any communication
       mixers     (mixers != "refuse") each sequence mixer's state-passing adapter proven by a probe, or
                  the gather path planned (passes/sequence_mixers.py; wrapped after the loss probe)
       mlp        (mlp="auto" / "tiled") each block's MLP (or a MoE's experts) proven per-token by a
                  probe, then run over chunks of tokens with recompute (passes/tiled_mlp.py); before
                  sync and before the plain-model overrides (no communication, no hooks of seqpar's)
    1. sync       parameters and buffers broadcast from the mesh's first rank (all ranks start equal)
    2. attention  Hugging Face model: a per-call "seqpar_<id>" implementation registered through
                  transformers' AttentionInterface / AttentionMaskInterface, model switched to it.
                  Plain PyTorch model: a TorchFunctionMode, active whenever one of the model's
                  modules runs (forward and checkpoint recomputation), turns every
                  F.scaled_dot_product_attention into seqpar.attention
    3. loss       root hooks: the loss becomes the mean over the *global* number of non-ignored
                  tokens, its value all-reduced over cp (the gradient stays local: the cp ranks'
                  gradients sum to the single-device one). HF: needs the batch of
                  seqpar.shard_batch (shift_labels, num_items_in_batch, global position_ids).
                  Plain model: its mean F.cross_entropy becomes sum / global count. Given labels, a
                  causal LM's head + cross-entropy run in chunks of tokens, the logits recomputed in
                  backward (passes/lm_loss.py; loss="auto": HF models where a probe at parallelize proves it
                  equal to the model's own, plain models through lazy logits checked on every forward
                  (passes/lazy_logits.py); loss="chunked": always or refused by name, "full": never)
       agreement  (HF, before the loss pass's hook) each forward's inputs checked on each rank and agreed in
                  one small all-gather (passes/agreement.py): a 2-D attention_mask beside the shard (the whole
                  sequence's all-ones mask localised, zeros refused: passes/padding.py), position_ids, labels;
                  a rank that rejects its inputs, or ranks that passed different kinds, fail on every rank
    4. checkpoint (checkpoint=True) every transformer block runs under non-reentrant
                  torch.utils.checkpoint; the ring attention's (out, lse) of the first forward are
                  kept, so the recomputation does not run the ring again (no K/V exchange);
                  offload="cpu": the checkpointed block inputs wait on the host (passes/offload.py)
    5. compile    (compile=True) every transformer block's forward (with its checkpoint) under
                  torch.compile, before data parallelism (torchtitan's order); seqpar attention is a
                  registered op there, saved by the selective checkpoint policy
    6. data-parallel gradients, over the dp x cp ranks flattened (parameters are replicated over
                  cp, so cp ranks share the sharding): fsdp=True: FSDP2 ``fully_shard`` per block,
                  then the root; fsdp=False: full parameters, each backward's gradients
                  all-reduced at its end in one collective per dtype (the same collectives on every
                  rank, whatever experts its tokens used). Either way the gradient is summed over cp and averaged
                  over dp (FSDP: SUM reduce-scatter + post-divide by dp, since gloo lacks PREMUL_SUM).
                  FSDP's memory options (seqpar/fsdp_options.py): ``precision`` (MixedPrecisionPolicy,
                  fp32 reduction), ``reshard`` (reshard_after_forward), ``fsdp_offload`` (CPUOffloadPolicy)

Semantics: each dp replica trains on its own batch; ``model(**shard_batch(batch))`` returns that
batch's single-device loss on every cp rank; gradients after ``backward`` are the mean over dp
replicas of their single-device gradients (DDP semantics), for FSDP as DTensors (``full_tensor()``).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from seqpar.fsdp_options import FSDPOffload, FSDPOptions, Precision, Reshard
from seqpar.mesh import cp_mesh, flat_mesh, is_hybrid_mesh
from seqpar.passes import hf
from seqpar.passes.agreement import agreement_pass
from seqpar.passes.attention import attention_pass
from seqpar.passes.check import check
from seqpar.passes.checkpoint import checkpoint_pass
from seqpar.passes.compile import compile_pass
from seqpar.passes.data_parallel import data_parallel_pass
from seqpar.passes.lm_loss import LossMode
from seqpar.passes.lm_loss import plan as plan_lm_loss
from seqpar.passes.loss import loss_pass
from seqpar.passes.offload import OffloadMode, offload_pass
from seqpar.passes.router import check_router_loss
from seqpar.mixing.base import MixerMode
from seqpar.passes.mixers import holds_interface_attention
from seqpar.passes.runtime import Runtime
from seqpar.passes.sequence_mixers import plan_mixers, sequence_mixer_pass
from seqpar.passes.sync import sync_params
from seqpar.passes.tiled_mlp import MLPMode, tiled_mlp_pass

__all__ = ["parallelize"]


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    layout: str = "zigzag",
    method: str = "ring",
    fsdp: bool = True,
    checkpoint: bool = False,
    compile: bool = False,
    backend: str = "auto",
    loss: LossMode = "auto",
    loss_chunk: int | None = None,
    precision: Precision = "fp32",
    reshard: Reshard = "after_forward",
    fsdp_offload: FSDPOffload = "none",
    mlp: MLPMode = "auto",
    mlp_chunk: int | None = None,
    offload: OffloadMode = "none",
    mixers: MixerMode = "auto",
) -> nn.Module:
    """Apply sequence parallelism (and FSDP2 / activation checkpointing) to ``model`` in place.

    ``mesh``: a DeviceMesh with a "cp" dim (``seqpar.init_mesh``); ("dp", "cp") for data parallelism
    on top. ``layout``/``method``/``backend`` as in :func:`seqpar.attention`; batches must be sharded
    with the same layout (:func:`seqpar.shard_batch`). ``compile=True`` compiles each block
    (``torch.compile``). Passes, in order: check, sync, attention, loss, checkpoint, compile,
    data-parallel gradients (see the module docstring). Returns ``model``.

    FSDP2's memory options (``fsdp=True`` only; :mod:`seqpar.fsdp_options`): ``precision`` "fp32" (no
    casting) | "bf16" | "fp16" (parameters gathered and computed in that dtype, gradients reduced in
    fp32, fp32 sharded parameters for the optimizer); ``reshard`` "after_forward" (blocks free their
    gathered parameters after forward) | "keep" (kept until their backward); ``fsdp_offload`` "none" |
    "cpu" (sharded parameters, gradients and optimizer state in host memory).

    ``mlp``: "auto" tiles a block MLP's call over chunks of tokens (recomputed in backward) when its
    intermediates would exceed 64 MiB, "tiled" always, "full" never; ``mlp_chunk``: tokens per chunk
    (default: what keeps a chunk's intermediates under 64 MiB). ``offload`` (``checkpoint=True`` only):
    "cpu" keeps the checkpointed block inputs in host memory until their backward.

    ``mixers``: sequence mixers besides attention (Mamba, gated DeltaNet, short convs, ...; found by
    :mod:`seqpar.passes.mixers`): "auto" state passing where an adapter is proven by a probe, else the
    module on the gathered sequence (O(S) activations, compute replicated over cp); "state" state
    passing or ``ValueError``; "gather" the gathered sequence everywhere; "refuse" refused by name.
    """
    fsdp_options = FSDPOptions(precision=precision, reshard=reshard, fsdp_offload=fsdp_offload)
    dp, kind, blocks, taken = check(model, mesh, layout=layout, method=method, fsdp=fsdp, checkpoint=checkpoint,
                                    compile=compile, backend=backend, loss=loss, loss_chunk=loss_chunk,
                                    fsdp_options=fsdp_options,
                                    mlp=mlp, mlp_chunk=mlp_chunk, offload=offload, mixers=mixers)
    router = check_router_loss(model)  # MoE router load-balancing loss: made global, or refused by name (router.py)
    if kind == "hf":  # positions a module derives from the local length: refused by name
        hf.check_positions(model, has_attention=holds_interface_attention(model))
    mixer_plans = plan_mixers(model, taken, mixers, layout)  # probes the state-passing adapters (no communication)
    tiled_mlp_pass(model, blocks, mlp, mlp_chunk)  # probes and wraps each block's MLP (no communication)
    rt = Runtime(cp_mesh(mesh).get_group(), layout, method, backend,
                 # hybrid (and auto, which may pick it) find their sub-groups in the mesh itself
                 attention_group=mesh if method in ("hybrid", "auto") and is_hybrid_mesh(mesh) else None)
    sync_params(model, flat_mesh(mesh).get_group())
    lm = plan_lm_loss(model, kind, loss, loss_chunk, flat_mesh(mesh).get_group())  # chunked LM head + loss, or None
    sequence_mixer_pass(model, mixer_plans, rt, kind, mixers)  # after the loss probe (a local forward): mixers wrapped
    attention_pass(model, kind, rt)
    if kind == "hf":  # each forward's inputs (attention_mask, position_ids, labels) agreed on every rank, first
        agreement_pass(model, rt, router)
    loss_pass(model, kind, rt, lm, router)
    if checkpoint:
        checkpoint_pass(model, blocks, rt, compiled=compile)
    if offload != "none":
        offload_pass(model, blocks)  # around each checkpointed block: its saved inputs to the host
    if compile:
        compile_pass(blocks)
    data_parallel_pass(model, blocks, mesh, dp, fsdp, fsdp_options)
    return model
