"""Cases of tests/test_trainer.py: Hugging Face Trainer / TRL SFTTrainer with seqpar.trainer vs the plain
single-process trainers, same data, same global batch, same seed, fp32.

Run as a script: ``python tests/trainer_cases.py reference OUT`` (one process: the plain ``Trainer`` /
``SFTTrainer``, no seqpar anywhere), ``torchrun --nproc-per-node 4 tests/trainer_cases.py seqpar OUT``
(the seqpar trainers on cp=4 and dp=2 x cp=2, bf16, the resume, the refusals) and
``accelerate launch --config_file launch/accelerate_cp.yaml tests/trainer_cases.py launched OUT [CP]`` (a short
run whose cp comes from the accelerate config, or from CP; also under SLURM's train.sbatch). Each writes JSON
(and the reference its final parameters) under OUT; the pytest side compares.

fp32 throughout except the bf16 case: TRL's ``SFTConfig`` defaults to ``bf16=True``, so it is passed False.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

import torch

V, STEPS, GA, GLOBAL_BATCH = 96, 20, 2, 4
SHORT = 3  # optimizer steps of the bf16 case and of the launched runs (accelerate launch, SLURM)
N_TRAIN, N_EVAL = STEPS * GA * GLOBAL_BATCH, 16
SFT_LEN = 32  # SFTTrainer's packed rows (max_length)


def make_model(kind: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).float()
    if kind == "mistral":  # a short sliding window: most pairs of a document lie outside it
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=6)).float()
    if kind == "qwen2":  # layer 0 full causal, layer 1 a window of 6 (layers >= max_window_layers slide)
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=6, max_window_layers=1)).float()
    raise ValueError(kind)


def make_examples(n: int, seed: int) -> list[dict]:
    """Documents of 8..20 tokens; a prompt of 2..4 tokens ignored by the loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(8, 21, (1,), generator=g))
        ids = torch.randint(3, V, (L,), generator=g).tolist()
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<pad>")


def _args(cls, out_dir: str, dp: int, **kw):
    base = dict(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // dp,
                per_device_eval_batch_size=GLOBAL_BATCH // dp, gradient_accumulation_steps=GA, optim="sgd",
                learning_rate=0.3, lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=0.5, logging_steps=1,
                save_strategy="no", report_to=[], seed=7, dataloader_drop_last=True, use_cpu=True,
                disable_tqdm=True, dataloader_num_workers=0, bf16=False, include_num_input_tokens_seen="all")
    return cls(**{**base, **kw})


def run(case: str, kind: str, out_dir: str, *, seqpar_cp: int | None, dp: int = 1, save_steps: int | None = None,
        resume: str | None = None, steps: int = STEPS, bf16: bool = False, plain: bool = False) -> dict:
    """One training run: ``steps`` optimizer steps (accumulation 2), then evaluate(). ``plain``: the plain
    single-process trainer; else seqpar's with ``seqpar_cp`` (None: the accelerate config's). Returns the logged
    losses, grad norms, token counts (Trainer's num_input_tokens_seen, TRL's num_tokens), eval loss and the trainer."""
    import datasets
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    train = datasets.Dataset.from_list(make_examples(N_TRAIN, 1))
    evals = datasets.Dataset.from_list(make_examples(N_EVAL, 2))
    save = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
    save.update(max_steps=steps, bf16=bf16)
    model = make_model(kind)
    if case == "trainer":
        args = _args(TrainingArguments, out_dir, dp, **save)
        kw = dict(model=model, args=args, train_dataset=train, eval_dataset=evals,
                  data_collator=DataCollatorWithFlattening())
        if plain:
            trainer = Trainer(**kw)
        else:
            from seqpar.trainer import SeqparTrainer

            trainer = SeqparTrainer(**kw, cp=seqpar_cp)
    elif case == "sft":
        from trl import SFTConfig, SFTTrainer

        args = _args(SFTConfig, out_dir, dp, packing=True, max_length=SFT_LEN, **save)
        kw = dict(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=make_tokenizer())
        if plain:
            trainer = SFTTrainer(**kw)
        else:
            from seqpar.trainer import SeqparSFTTrainer

            trainer = SeqparSFTTrainer(**kw, cp=seqpar_cp)
    else:
        raise ValueError(case)
    seen = set()  # the dtypes a block's MLP projection computes in (its weight, its input) during training
    proj = dict(trainer.model.named_modules())["model.layers.0.mlp.down_proj"]
    hook = proj.register_forward_hook(lambda m, a, o: seen.add((str(m.weight.dtype), str(a[0].dtype))))
    trainer.train(resume_from_checkpoint=resume)
    hook.remove()
    ev = trainer.evaluate()
    hist = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return dict(losses={int(h["step"]): float(h["loss"]) for h in hist},
                grad_norms={int(h["step"]): float(h["grad_norm"]) for h in hist if "grad_norm" in h},
                tokens_seen={int(h["step"]): h["num_input_tokens_seen"] for h in hist if "num_input_tokens_seen" in h},
                num_tokens={int(h["step"]): h["num_tokens"] for h in hist if "num_tokens" in h},
                eval_loss=float(ev["eval_loss"]), compute_dtypes=sorted(seen), trainer=trainer,
                cp=getattr(trainer, "seqpar_cp", None), dp=getattr(trainer, "seqpar_dp", None),
                world=int(os.environ.get("WORLD_SIZE", "1")))


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


CONFIGS = [("trainer", "llama"), ("trainer", "mistral"), ("trainer", "qwen2"), ("sft", "mistral")]
SHORT_RUNS = {"trainer_llama_bf16": dict(bf16=True), "trainer_llama_fp32": {}}  # + "launched": trainer_mistral


def reference(out: str) -> None:
    results = {}
    for case, kind in CONFIGS:
        with tempfile.TemporaryDirectory() as d:
            r = run(case, kind, d, seqpar_cp=None, plain=True)
        torch.save(full_state(r.pop("trainer").model), os.path.join(out, f"ref_{case}_{kind}.pt"))
        results[f"{case}_{kind}"] = r
    for key, kw in {**SHORT_RUNS, "launched": {}}.items():
        case, kind = ("trainer", "mistral") if key == "launched" else key.split("_")[:2]
        with tempfile.TemporaryDirectory() as d:
            r = run(case, kind, d, seqpar_cp=None, plain=True, steps=SHORT, **kw)
        r.pop("trainer")
        results[f"short_{key}"] = r
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(results, f)


def _rel_params(got: dict, want: dict) -> float:
    worst = 0.0
    for k, w in want.items():
        g = got[k].double()
        worst = max(worst, ((g - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item())
    return worst


def _refusal(fn) -> str | None:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def refusals(out_dir: str) -> dict:
    """Every rank: a cp that does not divide the world, a collator seqpar cannot shard, a refused model."""
    import datasets
    from torch import nn
    from transformers import TrainingArguments

    from seqpar.trainer import SeqparTrainer

    train = datasets.Dataset.from_list(make_examples(16, 1))
    res = {}
    res["cp3"] = _refusal(lambda: SeqparTrainer(model=make_model("llama"), args=_args(TrainingArguments, out_dir, 1),
                                                train_dataset=train, cp=3))

    def bad_collator(features):  # a 3-D "input_ids" (B, S, 1): not a (B, S) token batch
        ids = torch.tensor([f["input_ids"][:8] for f in features])
        return {"input_ids": ids[..., None], "labels": ids}

    t = SeqparTrainer(model=make_model("llama"), args=_args(TrainingArguments, out_dir, 1,
                                                            remove_unused_columns=False),
                      train_dataset=train, data_collator=bad_collator, cp=4)
    res["collator"] = _refusal(t.train)
    res["collator_steps"] = t.state.global_step

    class MHA(nn.Module):  # nn.MultiheadAttention: seqpar cannot shard it
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, input_ids, labels=None, **kw):
            x = self.emb(input_ids)
            return {"loss": self.attn(x, x, x)[0].sum()}

    res["model"] = _refusal(lambda: SeqparTrainer(model=MHA(), args=_args(TrainingArguments, out_dir, 1),
                                                  train_dataset=train, cp=4))
    res["fsdp"] = _refusal(lambda: SeqparTrainer(model=make_model("llama"), train_dataset=train, cp=4,
                                                 args=_args(TrainingArguments, out_dir, 1, fsdp="full_shard")))
    res["precision"] = _refusal(lambda: SeqparTrainer(model=make_model("llama"), train_dataset=train, cp=4,
                                                      args=_args(TrainingArguments, out_dir, 1, bf16=True),
                                                      parallelize_kwargs={"precision": "fp32"}))
    return res


def seqpar_runs(out: str) -> None:
    import torch.distributed as dist

    import seqpar

    seqpar.init_distributed()
    rank = dist.get_rank()
    refs = {k: torch.load(os.path.join(out, f"ref_{k}.pt")) for k in (f"{c}_{m}" for c, m in CONFIGS)}
    results: dict = {}
    shared = os.path.join(out, "ckpt")  # the same folder on every rank
    with tempfile.TemporaryDirectory() as scratch:
        results["refusals"] = refusals(scratch)
    for cp, dp in ((4, 1), (2, 2)):
        for case, kind in CONFIGS:
            key = f"{case}_{kind}"
            resume_here = (case, kind, dp) == ("trainer", "llama", 2)
            d = os.path.join(shared, f"{key}_cp{cp}") if resume_here else tempfile.mkdtemp(prefix="seqpar-t-")
            r = run(case, kind, d, seqpar_cp=cp, dp=dp, save_steps=10 if resume_here else None)
            state = full_state(r.pop("trainer").model)  # a collective: every rank
            r["param"] = _rel_params(state, refs[key]) if rank == 0 else None
            results[f"{key}_cp{cp}_dp{dp}"] = r
            if resume_here:  # a fresh trainer, resumed from step 10: steps 11..20 and the end state
                r2 = run(case, kind, d, seqpar_cp=cp, dp=dp, save_steps=10,
                         resume=os.path.join(d, "checkpoint-10"))
                state = full_state(r2.pop("trainer").model)
                r2["param"] = _rel_params(state, refs[key]) if rank == 0 else None
                results[f"{key}_cp{cp}_dp{dp}_resumed"] = r2
    for key, kw in SHORT_RUNS.items():  # bf16 (FSDP2 MixedPrecisionPolicy) and its fp32 twin, dp=2 x cp=2
        case, kind = key.split("_")[:2]
        r = run(case, kind, tempfile.mkdtemp(prefix="seqpar-t-"), seqpar_cp=2, dp=2, steps=SHORT, **kw)
        r.pop("trainer")
        results[f"short_{key}"] = r
    _write(out, f"seqpar_rank{rank}.json", results)


def launched(out: str, cp: str | None = None) -> None:
    """A short packed sliding-window run whose cp comes from the launcher's config (accelerate launch) or from the
    command line (SLURM); the Trainer's accelerator starts torch.distributed, as in a user's script."""
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])  # torchrun's (accelerate launch and train.sbatch start torchrun)
    cp = int(cp) if cp is not None else None
    dp = world // (cp if cp is not None else int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1")))
    r = run("trainer", "mistral", tempfile.mkdtemp(prefix="seqpar-t-"), seqpar_cp=cp, dp=dp, steps=SHORT)
    r.pop("trainer")
    _write(out, f"launched_rank{dist.get_rank()}.json", r)


def _write(out: str, name: str, results: dict) -> None:
    import torch.distributed as dist

    with open(os.path.join(out, name), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(840, exit=True)  # a hang prints every rank's stack instead of waiting
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    mode, out, *rest = sys.argv[1:]
    {"reference": reference, "seqpar": seqpar_runs, "launched": launched}[mode](out, *rest)
