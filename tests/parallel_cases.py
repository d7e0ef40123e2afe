"""Cases for tests/test_parallelize.py, run on every rank of a spawned gloo world (see world.py).

References are independent single-process runs on the full sequence: the unmodified model (HF with
torch SDPA, the GPT with plain SDPA), the loss shifted by the model itself (HF) or by plain slicing,
never seqpar code. Each case returns plain numbers; the pytest side asserts.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqpar

_MESHES: dict = {}  # (dp, cp) -> DeviceMesh, built once per spawned world (new_group is slow)


def mesh_for(dp: int, cp: int, ulysses: int = 1):
    if (dp, cp, ulysses) not in _MESHES:
        _MESHES[(dp, cp, ulysses)] = seqpar.init_mesh(cp=cp, dp=dp, ulysses=ulysses)
    return _MESHES[(dp, cp, ulysses)]


# ----------------------------------------------------------------------------- models and data


def make_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          rope_theta=1000.0, attn_implementation="sdpa")
        return LlamaForCausalLM(cfg).float()
    if kind in ("qwen2", "mistral"):
        import transformers

        name = {"qwen2": "Qwen2", "mistral": "Mistral"}[kind]
        cfg = getattr(transformers, f"{name}Config")(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
        return getattr(transformers, f"{name}ForCausalLM")(cfg).float()
    if kind in ("gpt", "gpt_user_ckpt"):  # gpt_user_ckpt: the model checkpoints its own blocks
        from seqpar.models import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=64, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             checkpoint=kind == "gpt_user_ckpt"))
    raise ValueError(kind)


def make_batch(replica: int, B: int, S: int, step: int = 0, vocab: int = 64) -> dict:
    """Full-sequence batch of dp replica ``replica``; labels with -100 spread unevenly (a long
    ignored prefix, so the first shards have few or no targets, plus random holes)."""
    g = torch.Generator().manual_seed(1000 * replica + step)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = ids.clone()
    labels[:, : S * 3 // 8] = -100  # prompt: ignored
    labels[torch.rand(B, S, generator=g) < 0.2] = -100
    labels[0, -S // 4:] = -100  # sample 0: also a padded tail
    return {"input_ids": ids, "labels": labels}


def reference_loss(kind: str, model, batch: dict) -> torch.Tensor:
    """Single-device loss, computed without seqpar: mean over non-ignored next-token targets."""
    if kind in ("llama", "qwen2", "mistral"):
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss  # HF shifts itself
    logits = model(batch["input_ids"]).logits  # (B, S, V)
    target = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- cases


def equivalence(rank, size, *, kind, dp, cp, layout, fsdp, checkpoint, B=2, S=64, steps=3, lr=0.5,
                method="ring", ulysses=1):
    """Train ``steps`` SGD-momentum steps with seqpar and with the single-device reference; return
    the worst relative errors of the loss (every step), every gradient (step 1) and every parameter
    (after the last step). (Not Adam: its g / (|g| + eps) turns float noise in near-zero gradient
    entries into whole +-lr steps, in any two fp32 runs that sum in a different order.)"""
    mesh = mesh_for(dp, cp, ulysses)
    replica = mesh.get_local_rank("dp")
    ref = make_model(kind)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, method=method, fsdp=fsdp,
                               checkpoint=checkpoint)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    res = dict(loss=0.0, grad=0.0, param=0.0, ngrads=0)
    for step in range(steps):
        batches = [make_batch(d, B, S, step) for d in range(dp)]
        # reference: mean over the dp replicas of each replica's single-device loss
        ref_losses = [reference_loss(kind, ref, b) for b in batches]
        opt_ref.zero_grad()
        (sum(ref_losses) / dp).backward()
        # seqpar
        opt.zero_grad()
        loss = model(**seqpar.shard_batch(batches[replica], mesh, layout=layout)).loss
        loss.backward()
        res["loss"] = max(res["loss"], _rel(loss.detach(), ref_losses[replica].detach()))
        if step == 0:
            got = dict(model.named_parameters())
            for name, p in ref.named_parameters():
                res["grad"] = max(res["grad"], _rel(_full(got[name].grad), p.grad))
                res["ngrads"] += 1
        opt_ref.step()
        opt.step()
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        res["param"] = max(res["param"], _rel(_full(got[name].detach()), p.detach()))
    return res


def count_checkpoint_exchanges(rank, size, *, kind, layout, S=64):
    """batch_isend_irecv calls in forward and in backward, and replayed attention calls in
    backward, for: no checkpointing ("none"), seqpar's (``checkpoint=True``), and, for the HF
    model, transformers' own gradient checkpointing ("hf", a control that re-runs the ring)."""
    from seqpar.methods import MethodFunction

    real, real_apply = dist.batch_isend_irecv, MethodFunction.apply
    calls: list[int] = []
    replays: list[int] = []

    def counting(ops):
        calls.append(len(ops))
        return real(ops)

    def counting_apply(q, k, v, method, kept=None, sinks=None):
        if kept is not None:  # a replay of a kept forward
            replays.append(1)
        return real_apply(q, k, v, method, kept, sinks)

    mesh = mesh_for(1, size)
    out = {}
    dist.batch_isend_irecv, MethodFunction.apply = counting, counting_apply
    try:
        for mode in ("none", "seqpar", "hf") if kind == "llama" else ("none", "seqpar"):
            model = make_model(kind)
            if mode == "hf":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = seqpar.parallelize(model, mesh, layout=layout, fsdp=False, checkpoint=mode == "seqpar")
            batch = seqpar.shard_batch(make_batch(0, 1, S), mesh, layout=layout)
            calls.clear()
            loss = model(**batch).loss
            fwd = len(calls)
            calls.clear()
            replays.clear()
            loss.backward()
            out[mode] = dict(fwd=fwd, bwd=len(calls), replays=len(replays), loss=loss.item(),
                             grad=next(model.parameters()).grad.norm().item())
    finally:
        dist.batch_isend_irecv, MethodFunction.apply = real, real_apply
    return out


def bad_input(rank, size, *, case):
    """(exception type name, message) of a bad call; made on every rank, or only on rank 0 for
    ``*_rank0`` cases (which must then fail without communicating, else other ranks would hang).

    The cases that used to be refused and are valid now (a length that does not divide, padding, packed
    position_ids, Gemma 2's soft-capping, gpt-oss's attention sinks) return ``(None, checks)``: for a
    batch ``{"got": .., "want": ..}``, this rank's shard by shard_batch and by its contract (written here,
    the layouts from fuzz_cases.ref_indices); for the models the relative errors of the loss and gradients
    vs the unmodified eager model on the full batch. tests/test_masks.py checks their training
    equivalence in depth."""
    import torch.nn as nn

    from fuzz_cases import ref_indices

    mesh = mesh_for(1, size)

    def expected_shard(ids, labels, layout, keep=None, cu=None, pos=None):
        """{input_ids, shift_labels, position_ids, cu_seq_lens_q, num_items_in_batch} of this rank, from the
        contract: targets are the next token's labels (ignored after the row's last real token), padding
        (``keep`` False) dropped, the length padded to a multiple of the layout's unit with one extra
        document (ids 0, positions continuing, targets ignored)."""
        S = ids.shape[1]
        keep = [True] * S if keep is None else keep
        pos = list(range(S)) if pos is None else pos
        lab = labels[0].tolist()
        target = [lab[i + 1] if i + 1 < S and keep[i + 1] else -100 for i in range(S)]
        real = [i for i in range(S) if keep[i]]
        ids_r, tgt_r, pos_r = [ids[0, i].item() for i in real], [target[i] for i in real], [pos[i] for i in real]
        n = len(real)
        unit = 2 * size if layout == "zigzag" else size
        pad = (-n) % unit
        cu = list(cu or [0, n]) + ([n + pad] if pad else [])
        ids_r, tgt_r = ids_r + [0] * pad, tgt_r + [-100] * pad
        pos_r = pos_r + [pos_r[-1] + 1 + j for j in range(pad)]
        idx = ref_indices(n + pad, rank, size, layout)
        return dict(input_ids=[ids_r[i] for i in idx], shift_labels=[tgt_r[i] for i in idx],
                    position_ids=[pos_r[i] for i in idx], cu_seq_lens_q=cu if len(cu) > 2 else None,
                    num_items_in_batch=sum(t != -100 for t in tgt_r))

    def sharded(batch, layout):
        out = seqpar.shard_batch(batch, mesh, layout=layout)
        cu = out.get("cu_seq_lens_q")
        return dict(input_ids=out["input_ids"][0].tolist(), shift_labels=out["shift_labels"][0].tolist(),
                    position_ids=out["position_ids"][0].tolist(), cu_seq_lens_q=None if cu is None else cu.tolist(),
                    num_items_in_batch=int(out["num_items_in_batch"]))

    try:
        if case in ("indivisible", "indivisible_striped"):  # padded at the end: one extra document
            layout = "zigzag" if case == "indivisible" else "striped"
            b = make_batch(0, 1, 8 * size + (2 if case == "indivisible" else 1))
            return None, dict(got=sharded(b, layout), want=expected_shard(b["input_ids"], b["labels"], layout))
        elif case == "no_attention":
            seqpar.parallelize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), mesh, fsdp=False)
        elif case == "mha":
            seqpar.parallelize(nn.ModuleList([nn.MultiheadAttention(8, 2)]), mesh, fsdp=False)
        elif case == "no_cp_mesh":
            from torch.distributed.device_mesh import init_device_mesh

            other = _MESHES.setdefault("dp_only", init_device_mesh("cpu", (size,), mesh_dim_names=("dp",)))
            if rank == 0:
                seqpar.parallelize(make_model("gpt"), other, fsdp=False)
        elif case == "no_cp_mesh_batch":
            other = _MESHES["dp_only"]
            seqpar.shard_batch(make_batch(0, 1, 64), other)
        elif case == "not_a_mesh":
            seqpar.parallelize(make_model("gpt"), dist.group.WORLD, fsdp=False)
        elif case == "bad_layout":
            seqpar.parallelize(make_model("gpt"), mesh, layout="diagonal", fsdp=False)
        elif case == "padding_mask":  # the padding dropped: one packed row of the 59 real tokens, padded to 64
            b = make_batch(0, 1, 64)
            b["attention_mask"] = torch.ones(1, 64, dtype=torch.long)
            b["attention_mask"][0, -5:] = 0
            keep = [True] * 59 + [False] * 5
            return None, dict(got=sharded(b, "zigzag"),
                              want=expected_shard(b["input_ids"], b["labels"], "zigzag", keep=keep))
        elif case in ("gemma2_softcap", "gptoss_sinks"):
            import transformers

            common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
            torch.manual_seed(0)  # the same model on every rank (the reference is this rank's copy)
            if case == "gemma2_softcap":  # the reference: transformers' eager attention (sdpa has no soft-cap)
                cfg = transformers.Gemma2Config(**common, attn_logit_softcapping=0.05, sliding_window=4096,
                                                attn_implementation="eager")
                model = transformers.Gemma2ForCausalLM(cfg)
            else:  # attention sinks (s_aux); the reference: eager attention (sdpa has no sinks)
                cfg = transformers.GptOssConfig(**common, num_local_experts=2, num_experts_per_tok=1,
                                                sliding_window=4096, attn_implementation="eager")
                model = transformers.GptOssForCausalLM(cfg)
            ref = copy.deepcopy(model.float())
            model = seqpar.parallelize(model.float(), mesh, fsdp=False)
            b = make_batch(0, 1, 8 * size)
            loss = model(**seqpar.shard_batch(b, mesh)).loss
            ref_loss = ref(input_ids=b["input_ids"], labels=b["labels"]).loss
            loss.backward()
            ref_loss.backward()
            got = dict(model.named_parameters())
            grad = max(_rel(got[n].grad, p.grad) for n, p in ref.named_parameters())
            return None, dict(loss=_rel(loss.detach(), ref_loss.detach()), grad=grad)
        elif case == "packed_position_ids":  # two documents: positions restart at 8 * size
            b = make_batch(0, 1, 16 * size)
            pos = list(range(8 * size)) * 2
            b["position_ids"] = torch.tensor(pos)[None]
            return None, dict(got=sharded(b, "zigzag"), want=expected_shard(
                b["input_ids"], b["labels"], "zigzag", cu=[0, 8 * size, 16 * size], pos=pos))
        elif case == "unsharded_hf_batch":
            model = seqpar.parallelize(make_model("llama"), mesh, fsdp=False)
            b = make_batch(0, 1, 8 * size)
            # on every rank: the forward's inputs are agreed in one all-gather before the model runs
            # (passes/agreement.py), so each rank fails there, naming shard_batch
            model(input_ids=b["input_ids"], labels=b["labels"])
        else:
            raise KeyError(case)
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e)
    return None, None


def synced(rank, size, *, bucket_bytes: int):
    """Rank-dependent parameters and buffers (fp32, bf16, int64, a non-contiguous one) through
    ``sync_params`` with small buckets -> (rank 0's values before, this rank's after), flattened fp64."""
    from seqpar.passes.sync import sync_params

    torch.manual_seed(100 + rank)
    m = torch.nn.Module()
    m.a = torch.nn.Linear(5, 7)
    m.b = torch.nn.Linear(3, 2).to(torch.bfloat16)
    m.c = torch.nn.Parameter(torch.randn(6, 4).t())  # non-contiguous
    m.register_buffer("steps", torch.randint(0, 1000, (9,)))
    before = torch.cat([t.detach().double().reshape(-1) for t in (*m.parameters(), *m.buffers())])
    first = before.clone()
    dist.broadcast(first, src=0)
    sync_params(m, dist.group.WORLD, bucket_bytes=bucket_bytes)
    after = torch.cat([t.detach().double().reshape(-1) for t in (*m.parameters(), *m.buffers())])
    return dict(want=first, got=after, mine=before, contiguous_c=m.c.is_contiguous())
