"""Hugging Face ``Trainer`` / TRL ``SFTTrainer`` on a sequence sharded over cp ranks.

The change to a training script is the class and one argument::

    from seqpar.trainer import SeqparTrainer          # was: from transformers import Trainer
    trainer = SeqparTrainer(model=model, args=args, train_dataset=ds, data_collator=collator, cp=4)

    from seqpar.trainer import SeqparSFTTrainer       # was: from trl import SFTTrainer
    trainer = SeqparSFTTrainer(model=model, args=SFTConfig(..., packing=True), train_dataset=ds, cp=4)

or, for another Trainer subclass, ``class MyTrainer(SeqparTrainerMixin, TheirTrainer)``. Nothing of
transformers, TRL or accelerate is patched; the trainer overrides its own (documented, subclassable) methods.

What the mixin does, step by step (cp ranks are the ``cp`` ranks of one sequence, dp = world // cp):

- ``__init__``: after the Trainer is built (its accelerator initialised torch.distributed), the mesh
  ``seqpar.init_mesh(cp)`` and ``seqpar.parallelize(model, mesh, ...)`` -- once: FSDP2 over dp x cp, seqpar's
  checkpointing, ``precision="bf16"`` when ``args.bf16`` (or the accelerate config's ``mixed_precision: bf16``;
  TRL's ``SFTConfig`` defaults to ``bf16=True``). The model is marked prepared for accelerate, so
  ``accelerator.prepare`` does not wrap it a second time (no DDP around FSDP2). Refusals (a cp that does not
  divide the world, a model ``parallelize`` refuses, options of the Trainer that would compute the loss on local
  logits) raise here on every rank, before any step.
- data: the dataloaders accelerate prepared are sharded over the dp ranks (``BatchSamplerShard`` with
  ``num_processes=dp``), so every rank of one cp group gets the same batch and dp ranks different ones.
- ``_prepare_inputs``: the collator's batch -> :func:`seqpar.shard_batch` (layout ``"packed"`` by default: packed
  documents dealt evenly, padding dropped, any length padded). A batch it cannot shard raises naming the keys.
- the loss: ``num_items_in_batch`` is counted on the unsharded batches of the gradient-accumulation step and summed
  over the dp ranks only (each cp group counted once); the model's loss is (this replica's target sum) / that
  count, scaled by dp because seqpar averages gradients over dp (and sums them over cp). So logged losses,
  gradients and ``evaluate()`` equal single-process training with the same global batch. (Trainer's own
  ``average_tokens_across_devices`` would count every cp replica and scale by the world size; this trainer does
  the count itself and keeps a private copy of ``args`` with that flag off.)
- token counts: Trainer's ``num_input_tokens_seen`` (``include_num_input_tokens_seen``) counts each cp group's batch
  once (its own count sums the unsharded batch over every rank); TRL's ``num_tokens`` leaves out the end padding
  ``shard_batch`` adds (TRL counts a sharded batch by its length), so both equal the unsharded run's.
- checkpoints: ``save_model`` gathers the full state dict (every rank joins, rank 0 writes ``save_pretrained``
  files); the optimizer is saved as a full, parameter-name-keyed state dict; ``resume_from_checkpoint`` loads
  both back into the sharded model / optimizer. Scheduler, RNG and trainer state are the Trainer's own.

``cp`` comes from one place: the ``cp=`` argument, or else ``parallelism_config_cp_size`` of the accelerate config
(``accelerate launch --config_file``), which this trainer takes over: accelerate is then given an empty parallelism
config (every size 1), so it applies no context parallelism of its own and accepts it on CPU ranks too.

Note
----
Launches: ``torchrun``, ``accelerate launch`` with ``distributed_type: MULTI_GPU`` (accelerate starts the ranks
with torchrun; ``use_cpu: true`` in the script's arguments makes them gloo CPU ranks; ``MULTI_CPU`` starts one
process unless accelerate is given an mpirun hostfile) and SLURM's ``launch/slurm/train.sbatch`` (torchrun per
node). An accelerate config with ``distributed_type: FSDP`` or DeepSpeed is refused: seqpar shards the model.

Precision: ``bf16`` is FSDP2's MixedPrecisionPolicy (bf16 parameters and activations in the forward and backward,
fp32 sharded parameters, gradient reduction and optimizer), not accelerate's autocast, which is not applied to a
model accelerate does not wrap. A bf16 run therefore equals single-process bf16 training to bf16 accuracy, not
bitwise; fp32 runs equal it to fp32 rounding (tests/test_trainer.py).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SeqparTrainerMixin", "SeqparTrainer", "SeqparSFTTrainer", "cp_from_accelerate"]

_ACCELERATE_CP = "PARALLELISM_CONFIG_CP_SIZE"  # what `accelerate launch` exports from parallelism_config_cp_size


def cp_from_accelerate(environ=None) -> int | None:
    """The cp size of the accelerate config this process was launched with (``parallelism_config_cp_size``), or
    None when ``accelerate launch`` set none."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() != "true" or _ACCELERATE_CP not in env:
        return None
    try:
        return int(env[_ACCELERATE_CP])
    except ValueError:
        raise ValueError(f"{_ACCELERATE_CP}={env[_ACCELERATE_CP]!r} (from the accelerate config's "
                         f"parallelism_config_cp_size) is not an integer") from None


class _Sharded(dict):
    """A batch already sharded by :func:`seqpar.shard_batch` (``_prepare_inputs`` may be called twice)."""


class SeqparTrainerMixin:
    """Put first in the bases of a ``transformers.Trainer`` subclass (see the module docstring).

    Keyword arguments besides the Trainer's: ``cp`` (ranks per sequence; None: the accelerate config's
    ``parallelism_config_cp_size``, else 1), ``layout`` (of :func:`seqpar.shard_batch` and the model, default
    ``"packed"``), ``parallelize_kwargs`` (more options of :func:`seqpar.parallelize`: ``method``, ``checkpoint``,
    ``loss``, ``mlp``, ``reshard``, ...). ``args.bf16`` -> ``precision="bf16"``; ``args.fp16`` -> ``"fp16"`` (also when set by the accelerate config's
    ``mixed_precision``).
    """

    _seqpar_model_reduces_loss = True  # the model's own loss: already summed over cp by seqpar's loss pass

    def __init__(self, *args, cp: int | None = None, layout: str = "packed",
                 parallelize_kwargs: dict[str, Any] | None = None, **kwargs):
        import seqpar

        self._seqpar_cp_arg = cp
        super().__init__(*args, **kwargs)
        seqpar.init_distributed()  # a no-op when the Trainer's accelerator started torch.distributed
        world = dist.get_world_size()
        cp = self._seqpar_resolve_cp(world)
        self._seqpar_refuse_local_loss()
        self._seqpar_refuse_accelerate_sharding()
        if world % cp:
            raise ValueError(f"seqpar Trainer: cp={cp} does not divide the world size {world} (launched ranks); pass a "
                             f"cp that divides it (dp = world // cp ranks then get different batches)")
        self.seqpar_mesh = mesh = seqpar.init_mesh(cp=cp)
        self.seqpar_cp, self.seqpar_dp = cp, world // cp
        self.seqpar_layout = layout
        options = dict(parallelize_kwargs or {})
        # the Trainer's activation checkpointing (TRL's default) re-runs the attention ring in the backward: it
        # becomes seqpar's, which replays each block's attention from its kept output instead
        self.args = copy.copy(self.args)  # a private copy: the caller's args stay as given
        ckpt = [n for n in ("activation_checkpointing", "gradient_checkpointing") if getattr(self.args, n, False)]
        if ckpt:
            options.setdefault("checkpoint", True)
            for n in ckpt:
                setattr(self.args, n, False)
        precision = self._seqpar_precision()
        if options.get("precision", precision) != precision:
            raise ValueError(f"seqpar Trainer: parallelize_kwargs['precision']={options['precision']!r} but the "
                             f"Trainer's mixed precision (args.bf16 / args.fp16 / the accelerate config) is "
                             f"{precision!r}; set it in one place")
        if precision != "fp32":
            options["precision"] = precision
            options.setdefault("fsdp", True)
        options.setdefault("layout", layout)
        if options["layout"] != layout:
            raise ValueError(f"seqpar Trainer: layout={layout!r} but parallelize_kwargs['layout']="
                             f"{options['layout']!r}; the batch and the model must use one layout")
        for key, value in self._seqpar_default_options().items():
            options.setdefault(key, value)
        self.model = seqpar.parallelize(self.model, mesh, **options)  # the same object, parallelized in place
        self.model._is_accelerate_prepared = True  # accelerate's prepare_model returns it as is (no DDP around it)
        self.model_wrapped = self.model
        # the token count is done here, once per cp group (see _get_num_items_in_batch); Trainer's own would count
        # every cp replica and scale the loss by the world size
        self._seqpar_average_tokens = bool(self.args.average_tokens_across_devices)
        self.args.average_tokens_across_devices = False

    # ------------------------------------------------------------------ set-up

    def _seqpar_default_options(self) -> dict[str, Any]:
        return {}

    def _seqpar_precision(self) -> str:
        """The Trainer's mixed precision (``args.bf16`` / ``args.fp16``, or the accelerate config's ``mixed_precision``,
        which TrainingArguments reads from ACCELERATE_MIXED_PRECISION) -> parallelize's FSDP2 ``precision``. The model
        is not wrapped by accelerate, so its autocast does not apply: FSDP2's MixedPrecisionPolicy does instead."""
        mp = str(getattr(self.args, "mixed_precision", None) or "no").lower()
        if self.args.bf16 or mp == "bf16":
            return "bf16"
        if self.args.fp16 or mp == "fp16":
            return "fp16"
        if mp != "no":
            raise ValueError(f"seqpar Trainer: mixed precision {mp!r} (args / the accelerate config's mixed_precision) "
                             f"is not supported; use bf16, fp16 or no")
        return "fp32"

    def _seqpar_refuse_accelerate_sharding(self) -> None:
        """accelerate's own model wrappers (FSDP / DeepSpeed plugins from args or the accelerate config): seqpar
        parallelizes the model itself (FSDP2 over dp x cp), a second wrapper would shard it again."""
        for flag, arg, what in (("is_fsdp_enabled", "fsdp", "FSDP (args.fsdp / distributed_type: FSDP)"),
                                ("is_deepspeed_enabled", "deepspeed",
                                 "DeepSpeed (args.deepspeed / distributed_type: DEEPSPEED)")):
            if getattr(self, flag, False) or getattr(self.args, arg, None):
                raise ValueError(f"seqpar Trainer: the Trainer is set up for {what}; seqpar applies FSDP2 over dp x cp "
                                 f"itself. Launch plain ranks (torchrun, or an accelerate config with distributed_type: "
                                 f"MULTI_GPU, use_cpu: true on CPU ranks) and pass seqpar's options as parallelize_kwargs")

    def _seqpar_resolve_cp(self, world: int) -> int:
        cp, from_env = self._seqpar_cp_arg, cp_from_accelerate()
        if cp is None:
            cp = from_env if from_env is not None else 1
        elif from_env is not None and from_env not in (1, cp):
            raise ValueError(f"seqpar Trainer: cp={cp} but the accelerate config says parallelism_config_cp_size="
                             f"{from_env}; give the cp size in one place")
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
            raise ValueError(f"seqpar Trainer: cp must be a positive int (ranks per sequence), got {cp!r}")
        if from_env is not None and world % cp == 0:
            _check_accelerate_sizes(os.environ, world // cp)
        return cp

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        """The accelerate config's cp is seqpar's: accelerate gets an empty parallelism config (every size 1) in place
        of the one it would build from the launch environment, so it adds no context parallelism of its own. An empty
        config is valid on every distributed type (accelerate refuses a non-empty one on MULTI_CPU ranks); on GPU ranks
        accelerate sets its dp_replicate to the world itself, and this trainer narrows data parallelism to dp."""
        out = super()._build_accelerator_args(**kwargs)
        from_env = cp_from_accelerate()
        if out.get("parallelism_config") is None and from_env is not None:
            from accelerate import ParallelismConfig

            out["parallelism_config"] = ParallelismConfig(dp_replicate_size=1, dp_shard_size=1, cp_size=1,
                                                          tp_size=1, sp_size=1)
        elif out.get("parallelism_config") is not None:
            pc = out["parallelism_config"]
            if pc.cp_size > 1 or pc.tp_size > 1 or pc.sp_size > 1 or pc.dp_shard_size > 1:
                raise ValueError("seqpar Trainer: args.parallelism_config asks accelerate for cp/tp/sp/FSDP; seqpar "
                                 "parallelizes the model itself: drop it and pass cp= to the trainer")
        return out

    def _seqpar_refuse_local_loss(self) -> None:
        """Losses the Trainer would compute from this rank's logits alone (shifting them locally)."""
        if self.args.label_smoothing_factor:
            raise ValueError("seqpar Trainer: label_smoothing_factor computes the loss from the logits of this rank's "
                             "shard, shifted locally; it is not supported (set label_smoothing_factor=0)")
        if self.compute_loss_func is not None:
            raise ValueError("seqpar Trainer: compute_loss_func receives the logits of this rank's shard only; it is "
                             "not supported (leave it None: the model's loss is made the global-token mean)")
        if self.args.n_gpu > 1:
            raise ValueError("seqpar Trainer: one process sees several GPUs (nn.DataParallel); launch one process per "
                             "device (torchrun / accelerate launch / srun)")

    # ------------------------------------------------------------------ data

    def _get_dataloader(self, *args, **kwargs):
        loader = super()._get_dataloader(*args, **kwargs)
        self._seqpar_shard_over_dp(loader)
        return loader

    def _seqpar_shard_over_dp(self, loader) -> None:
        """Batches dealt over the dp ranks, the same batch on every rank of a cp group."""
        if dist.get_world_size() == 1:
            return
        shard = getattr(loader, "batch_sampler", None)
        if not (hasattr(shard, "num_processes") and hasattr(shard, "process_index")):
            raise TypeError(f"seqpar Trainer: the dataloader ({type(loader).__name__}) does not deal batches through "
                            f"accelerate's BatchSamplerShard (an IterableDataset, or dispatch_batches=True); use a "
                            f"map-style dataset (datasets.Dataset / torch Dataset with __len__)")
        shard.num_processes = self.seqpar_dp
        shard.process_index = self.seqpar_mesh.get_local_rank("dp")
        if self.seqpar_dp == 1 and hasattr(shard, "even_batches"):
            shard.even_batches = False  # one replica: a short last batch stays short, as in one process

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self.seqpar_dp

    def _track_num_input_tokens(self, inputs):
        """``num_input_tokens_seen``: Trainer counts the collator's (unsharded) batch on every rank and sums the
        counts over the world, so each cp group's batch cp times; its increment divided by cp (exact: the cp ranks
        of a group count the same batch)."""
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self.seqpar_cp

    def _prepare_inputs(self, inputs):
        if isinstance(inputs, _Sharded):
            return inputs
        import seqpar

        inputs = super()._prepare_inputs(inputs)
        batch = {k: v for k, v in inputs.items() if v is not None}
        extra = {k: batch.pop(k) for k in ("use_cache", "return_dict") if k in batch}
        # TRL's padding-free collator adds seq_idx (each token's document, for Mamba kernels): cu_seq_lens says the
        # same, and the models seqpar takes have no use for it (it refuses SSM mixers)
        batch.pop("seq_idx", None)
        try:
            out = seqpar.shard_batch(batch, self.seqpar_mesh, layout=self.seqpar_layout)
        except (ValueError, TypeError) as e:
            raise type(e)(f"seqpar Trainer: the data collator's batch (keys {sorted(batch)}) cannot be sharded along "
                          f"the sequence: {e}. Use a collator that returns input_ids / labels / position_ids / "
                          f"attention_mask (e.g. DataCollatorWithFlattening, DataCollatorForLanguageModeling, TRL's "
                          f"padding-free collator)") from e
        return _Sharded({**out, **extra})

    # ------------------------------------------------------------------ loss

    def _seqpar_count(self, n):
        """This replica's target count -> the count of the whole dp batch (when averaging tokens over devices)."""
        if not self._seqpar_average_tokens or self.seqpar_dp == 1:
            return n
        n = torch.as_tensor(n, device=self.args.device).clone()
        dist.all_reduce(n, group=self.seqpar_mesh.get_group("dp"))
        return n

    def _seqpar_scale(self) -> int:
        return self.seqpar_dp if self._seqpar_average_tokens else 1

    def _get_num_items_in_batch(self, batch_samples, device):
        """Targets of the unsharded batches of one accumulation step (Trainer's own count: ``shift_labels`` or
        ``labels[..., 1:]``), summed over the dp ranks: each cp group once."""
        if batch_samples and all(isinstance(b, _Sharded) for b in batch_samples):
            # already sharded (prediction_step counts after _prepare_inputs): shard_batch's count of the whole sequence
            if not all("num_items_in_batch" in b for b in batch_samples):
                return None
            n = sum(b["num_items_in_batch"] for b in batch_samples)
        else:
            n = super()._get_num_items_in_batch(batch_samples, device)
        return None if n is None else self._seqpar_count(n)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from seqpar.passes.loss import reduce_forward

        if "labels" not in inputs:
            raise ValueError("seqpar Trainer: the batch has no labels; the collator must return labels")
        if num_items_in_batch is None:  # evaluation (prediction_step): this batch's count, over the dp ranks
            num_items_in_batch = self._seqpar_count(inputs["num_items_in_batch"])
        inputs = _Sharded(inputs)
        inputs["num_items_in_batch"] = num_items_in_batch  # what the model divides its target sum by
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = out if return_outputs else (out, None)
        if not self._seqpar_model_reduces_loss:  # a loss computed from this rank's tokens: its value over cp
            loss = reduce_forward(loss, self.seqpar_mesh.get_group("cp"))
        loss = loss * self._seqpar_scale()  # gradients are averaged over dp (summed over cp)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ checkpoints

    def _seqpar_inner_optimizer(self):
        opt = self.optimizer
        while hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer):
            opt = opt.optimizer
        return opt

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The full state dict, gathered on every rank (a collective), written by the saving rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            self._save(output_dir, state_dict=state)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        state = get_optimizer_state_dict(self.model, self._seqpar_inner_optimizer(),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = _read_weights(resume_from_checkpoint)
        model = self.model if model is None else model
        missing = set(model.state_dict()) - set(state)
        tied = {k for k in missing if _is_tied(model, k)}
        if missing - tied:
            raise ValueError(f"seqpar Trainer: checkpoint {resume_from_checkpoint} lacks {sorted(missing - tied)[:5]}")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=not tied))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        path = os.path.join(checkpoint, OPTIMIZER_NAME)
        if not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        opt = self._seqpar_inner_optimizer()
        if state.get("state"):
            set_optimizer_state_dict(self.model, opt, state, options=StateDictOptions(full_state_dict=True))
        else:  # a stateless optimizer (plain SGD): its hyperparameters only (torch's loader needs a state tensor)
            for group, saved in zip(opt.param_groups, state.get("param_groups", [])):
                group.update({k: v for k, v in saved.items() if k != "params"})
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))


def _check_accelerate_sizes(environ, dp: int) -> None:
    """The other sizes of the accelerate config's parallelism_config: tp / sp are refused, data parallelism
    (dp_replicate x dp_shard) must be 1 (unset) or the dp that cp leaves (seqpar shards it with FSDP2 over dp x cp)."""
    def size(name: str) -> int:
        key = f"PARALLELISM_CONFIG_{name.upper()}_SIZE"
        try:
            return int(environ.get(key, "1"))
        except ValueError:
            raise ValueError(f"{key}={environ[key]!r} (the accelerate config's parallelism_config_{name}_size) is not "
                             f"an integer") from None

    for name in ("tp", "sp"):
        if size(name) > 1:
            raise ValueError(f"seqpar Trainer: the accelerate config sets parallelism_config_{name}_size="
                             f"{size(name)}; seqpar does context parallelism only (cp): set it to 1")
    data = size("dp_replicate") * size("dp_shard")
    if data not in (1, dp):
        raise ValueError(f"seqpar Trainer: the accelerate config's parallelism_config_dp_replicate_size x "
                         f"dp_shard_size = {data}, but world // cp = {dp}; leave them 1 (dp is world // cp, sharded "
                         f"with FSDP2 over dp x cp by seqpar)")


def _read_weights(folder: str) -> dict[str, torch.Tensor]:
    """The weights ``save_pretrained`` wrote in ``folder`` (safetensors, one file or an index of shards)."""
    import json

    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(os.path.join(folder, name)))
        return state
    raise ValueError(f"seqpar Trainer: no model.safetensors in checkpoint {folder}")


def _is_tied(model, key: str) -> bool:
    """Whether ``key`` is a parameter tied to another one (``save_pretrained`` writes one of them)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = tied.keys() if isinstance(tied, dict) else tied
    return any(key == n or key.endswith("." + n) for n in names)


def _trainer_class():
    from transformers import Trainer

    class SeqparTrainer(SeqparTrainerMixin, Trainer):
        """``transformers.Trainer`` on a sequence sharded over ``cp`` ranks (see :mod:`seqpar.trainer`)."""

    return SeqparTrainer


def _sft_trainer_class():
    from trl import SFTTrainer

    class SeqparSFTTrainer(SeqparTrainerMixin, SFTTrainer):
        """TRL ``SFTTrainer`` on a sequence sharded over ``cp`` ranks (see :mod:`seqpar.trainer`).

        SFTTrainer computes the loss itself from per-token log-probabilities (its fused LM head, given the
        pre-shifted ``shift_labels`` of the shard): that value is this rank's part and is summed over cp here;
        seqpar's own chunked loss is off (``loss="full"``), the fused head already computes in chunks."""

        _seqpar_model_reduces_loss = False

        def _seqpar_default_options(self) -> dict[str, Any]:
            return {"loss": "full"}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if self.model.training:
                self._seqpar_uncount_padding(inputs)
            return out

        def _seqpar_uncount_padding(self, inputs) -> None:
            """TRL's ``num_tokens`` metric adds, in training, the batch's ``attention_mask.sum()`` or else its
            ``position_ids.size(1)``, summed over the world. A sharded batch has no attention_mask (shard_batch drops
            the padding), so TRL counts every rank's local length: over a cp group the whole sequence, real tokens
            plus the end padding shard_batch added to make the length divide (``seqpar_tokens`` False). That
            padding, summed over the world, is taken back off TRL's running count, which then equals the
            unsharded run's. One small all-reduce per training micro-step, on every rank (dp replicas need not
            all have padding)."""
            real = inputs.get("seqpar_tokens")  # (B, S_local) bool, only when shard_batch padded the end
            pad = (~real).sum() if real is not None else torch.zeros((), device=self.args.device)
            pad = pad.to(device=self.args.device, dtype=torch.int64)
            dist.all_reduce(pad)  # the world, as TRL's gather_for_metrics
            self._total_train_tokens -= int(pad) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    return SeqparSFTTrainer


def __getattr__(name: str):  # the classes import transformers / trl only when asked for
    if name == "SeqparTrainer":
        return _cached(name, _trainer_class)
    if name == "SeqparSFTTrainer":
        return _cached(name, _sft_trainer_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cached(name, make):
    cls = globals().get("_" + name)
    if cls is None:
        cls = globals()["_" + name] = make()
        cls.__module__ = __name__
        cls.__qualname__ = name
    return cls
