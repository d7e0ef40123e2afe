"""Fine-tune a tiny Llama / Qwen2 (built from its config, nothing downloaded) on a generated long-context task with
the Hugging Face ``Trainer`` or TRL's ``SFTTrainer``, sequence-parallel over ``cp`` ranks with seqpar.

The seqpar change to an ordinary Trainer script is the import and ``cp=`` (marked ``# seqpar`` below).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 examples/finetune_trainer.py --cp 4
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 examples/finetune_trainer.py --cp 2 --trainer sft
    accelerate launch --config_file launch/accelerate_cp.yaml examples/finetune_trainer.py   # cp=2 from the config
    GPUS_PER_NODE=4 sbatch -N 1 launch/slurm/train.sbatch examples/finetune_trainer.py --cp 2

Task: each document hides a key -> value record in its first 3/4 and asks for the key's value at its end; only
the answer is a target, so the loss falls only if attention reaches back across the shards. Documents of 200-500
tokens are packed (``DataCollatorWithFlattening`` / ``SFTConfig(packing=True)``).
"""

from __future__ import annotations

import argparse
import random

import torch


def make_documents(n: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    keys, values = range(4, 4 + (vocab - 4) // 2), range(4 + (vocab - 4) // 2, vocab)
    docs = []
    for _ in range(n):
        L = rng.randint(200, 500)
        ids = [rng.randrange(4, vocab) for _ in range(L)]
        k, v = rng.choice(keys), rng.choice(values)
        at = rng.randrange(0, L * 3 // 4)
        ids[at:at + 3] = [1, k, v]  # record: marker, key, value
        ids[-3:] = [2, k, v]  # query: marker, key -> value
        docs.append({"input_ids": ids, "labels": [-100] * (L - 1) + [v]})
    return docs


def build_model(kind: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, **{f"t{i}": i for i in range(1, vocab)}}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="t3", unk_token="<pad>")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=None, help="ranks per sequence (default: the accelerate config's)")
    p.add_argument("--trainer", choices=["trainer", "sft"], default="trainer")
    p.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (FSDP2 MixedPrecisionPolicy); "
                   "given explicitly for both trainers, since TRL's SFTConfig would default to bf16=True")
    p.add_argument("--output", default="finetune-out")
    a = p.parse_args(argv)
    import datasets
    from transformers import DataCollatorWithFlattening, TrainingArguments

    vocab = 128
    train = datasets.Dataset.from_list(make_documents(2000, vocab, 0))
    evals = datasets.Dataset.from_list(make_documents(32, vocab, 1))
    common = dict(output_dir=a.output, max_steps=a.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=3e-3, warmup_steps=5, logging_steps=5, eval_strategy="steps", eval_steps=a.steps,
                  save_steps=a.steps, report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                  bf16=a.bf16)
    if a.trainer == "trainer":
        from seqpar.trainer import SeqparTrainer  # seqpar (was: from transformers import Trainer)

        trainer = SeqparTrainer(model=build_model(a.model, vocab), args=TrainingArguments(**common),
                                train_dataset=train, eval_dataset=evals, data_collator=DataCollatorWithFlattening(),
                                cp=a.cp)  # seqpar
    else:
        from trl import SFTConfig

        from seqpar.trainer import SeqparSFTTrainer  # seqpar (was: from trl import SFTTrainer)

        trainer = SeqparSFTTrainer(model=build_model(a.model, vocab),
                                   args=SFTConfig(**common, packing=True, max_length=2048),
                                   train_dataset=train, eval_dataset=evals, processing_class=tokenizer(vocab),
                                   cp=a.cp)  # seqpar
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"cp={trainer.seqpar_cp} dp={trainer.seqpar_dp}: final eval {trainer.evaluate()}")
    else:
        trainer.evaluate()


if __name__ == "__main__":
    main()
