"""The chunked LM head + cross-entropy (seqpar/passes/lm_loss.py): the function against
F.cross_entropy, the probe's verdict per model, the hooks in one process, and parallelize on 2 and 4
gloo ranks against the unmodified single-process models; a memory test that full logits cannot pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lm_loss_cases as lc
from seqpar.passes.lm_loss import _post_forward, chunked_cross_entropy, plan

pytest.importorskip("transformers")

POSTS = [(), (("mul", 0.25),), (("div", 4.0),), (("softcap", 3.0),), (("mul", 2.0), ("softcap", 5.0))]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("post", POSTS, ids=lambda p: "+".join(o for o, _ in p) or "plain")
def test_function_matches_cross_entropy(post):
    """Loss sum and the gradients of hidden, weight and bias equal autograd through the full logits (fp32):
    chunks that do not divide the 37 tokens, ignored targets, label smoothing, with and without bias."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 37, 16, 50
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.3] = -7
    for bias in (False, True):
        for eps in (0.0, 0.1):
            for chunk in (1, 5, 16, 37, 64):
                h = (torch.randn(N, H, generator=g) * 2).requires_grad_()
                w = torch.randn(V, H, generator=g).requires_grad_()
                b = torch.randn(V, generator=g).requires_grad_() if bias else None
                z, _ = _post_forward(F.linear(h, w, b), post)
                want = F.cross_entropy(z.float(), t, ignore_index=-7, reduction="sum", label_smoothing=eps)
                params = [h, w] + ([b] if bias else [])
                dwant = torch.autograd.grad(want, params)
                got = chunked_cross_entropy(h, w, b, t, post=post, ignore_index=-7, label_smoothing=eps, chunk=chunk)
                dgot = torch.autograd.grad(got, params)
                what = f"bias={bias} eps={eps} chunk={chunk}"
                assert _rel(got, want) < 1e-6, what
                for x, y in zip(dgot, dwant):
                    assert _rel(x, y) < 1e-5, what


def test_function_checks_targets():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(IndexError, match="out of bounds"):
        chunked_cross_entropy(h, w, None, torch.tensor([1, 2, 10, 3]))
    with pytest.raises(IndexError, match="out of bounds"):
        chunked_cross_entropy(h, w, None, torch.tensor([1, -5, 2, 3]))


@pytest.mark.parametrize("name", list(lc.MODELS))
def test_probe_finds_the_head_transform(name):
    """The probe reads the transform between lm_head and the loss from the model's own forward."""
    want = {"gemma2": (("softcap", 3.0),), "cohere": (("mul", 0.25),), "granite": (("div", 4.0),)}.get(name, ())
    lm = plan(lc.make_model(name), "hf", "chunked", None, None)
    assert lm is not None and lm.post == want
    assert (lm.aux_coef == 0.5) if name == "mixtral" else True


def _install(model, chunk):
    """The loss pass's two hook calls, without the reduce over cp (one process)."""
    lm = plan(model, "hf", "chunked", chunk, None)

    def pre(module, args, kwargs):
        lm.start(kwargs)
        return args, kwargs

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(lambda m, a, kw, out: lm.finish(out, kw), with_kwargs=True, always_call=True)
    return model


@pytest.mark.parametrize("name", list(lc.MODELS))
def test_single_process_equals_model(name):
    """In one process, the model with the chunked head and loss (chunks of 5 of 2 x 13 tokens) returns the
    model's own loss (fp32: rel < 1e-6) and gradients (rel < 1e-5), logits None; tied embeddings get one
    gradient on the shared parameter; the batch's num_items_in_batch and ignored labels are honoured."""
    ref = lc.make_model(name)
    model = _install(copy.deepcopy(ref), chunk=5)
    batch = lc.make_batch(2, 13, seed=4)
    shift = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)
    kw = dict(shift_labels=shift, num_items_in_batch=(shift != -100).sum())
    want = ref(input_ids=batch["input_ids"], labels=batch["labels"], **kw)
    want.loss.backward()
    got = model(input_ids=batch["input_ids"], labels=batch["labels"], **kw)
    got.loss.backward()
    assert got.logits is None
    assert _rel(got.loss, want.loss) < 1e-6
    mine = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        assert _rel(mine[n].grad, p.grad) < 1e-5, n
    if "tied" in name:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    # without labels the model's own path: full logits
    assert model(input_ids=batch["input_ids"]).logits.shape == (2, 13, 96)


def test_refused_by_name():
    """A transform seqpar does not reproduce: "chunked" raises naming the class, "auto" keeps the model's path."""
    model = lc.make_model("llama")
    model.lm_head.register_forward_hook(lambda m, a, out: out * 1.5)  # a logit scale the config does not say
    with pytest.raises(ValueError, match="LlamaForCausalLM.*cannot be chunked"):
        plan(model, "hf", "chunked", None, None)
    assert plan(model, "hf", "auto", None, None) is None
    assert plan(lc.make_model("llama"), "hf", "full", None, None) is None


def test_options_checked():
    """parallelize's loss / loss_chunk, checked in the check pass (before any communication)."""
    from seqpar.passes.lm_loss import check_loss

    with pytest.raises(ValueError, match="loss must be one of"):
        check_loss("chunky", None)
    with pytest.raises(TypeError, match="loss_chunk must be an int"):
        check_loss("auto", 2.5)
    with pytest.raises(TypeError, match="loss_chunk must be an int"):
        check_loss("auto", True)
    with pytest.raises(ValueError, match="loss_chunk must be >= 1"):
        check_loss("chunked", 0)
    check_loss("full", 4096)


CASES = [  # (ranks, model, layout, packed, fsdp, checkpoint, loss)
    (2, "llama", "zigzag", False, False, False, "auto"),
    (2, "gemma2", "zigzag", True, False, False, "chunked"),
    (2, "cohere", "contiguous", False, True, False, "chunked"),
    (2, "granite", "striped", True, False, True, "auto"),
    (2, "qwen2_tied", "zigzag", False, True, True, "chunked"),
    (4, "llama_tied", "zigzag", True, False, False, "chunked"),
    (4, "gemma2", "zigzag", False, True, False, "auto"),
    (4, "mixtral", "zigzag", False, False, False, "chunked"),
    (2, "llama", "zigzag", False, False, False, "full"),
]


@pytest.mark.parametrize("P", [2, 4])
def test_parallelize_equals_single_process(worlds, P):
    """Under parallelize (loss_chunk=7: chunks that do not divide the local tokens) the loss and every gradient
    equal the unmodified single-process model's (fp32), with packed documents, FSDP2 and checkpointing in
    the mix; logits are None unless loss="full"."""
    w = worlds(P)
    for ranks, name, layout, packed, fsdp, ckpt, loss in [c for c in CASES if c[0] == P]:
        what = f"{name} P={P} layout={layout} packed={packed} fsdp={fsdp} checkpoint={ckpt} loss={loss}"
        for res in w.run(lc.equivalence, name=name, layout=layout, packed=packed, fsdp=fsdp, checkpoint=ckpt,
                         loss=loss):
            assert res["loss"] < 1e-5, (what, res)
            assert res["grad"] < 1e-4, (what, res)
            assert res["logits"] == (loss == "full"), (what, res)
    if P == 2:
        for res in w.run(lc.plain_equivalence):
            assert res["loss"] < 1e-5 and res["grad"] < 1e-4 and res["logits_numel"] == 0, res


def test_memory(worlds):
    """2 ranks, vocab 128000, 2048 local tokens: full local fp32 logits are 1.05 GB; a training step with
    the chunked loss raises the peak resident memory by less than half of that."""
    for res in worlds(2).run(lc.memory, loss="auto", timeout=300):
        assert res["logits_bytes"] >= 1_000_000_000, res
        assert res["rise"] < res["logits_bytes"] / 2, res
