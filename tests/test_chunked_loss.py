"""The chunked LM head + cross-entropy (seqpar/passes/lm_loss.py): the function against
F.cross_entropy, the probe's verdict per model, the hooks in one process, and parallelize on 2 and 4
gloo ranks against the unmodified single-process models; a memory test that full logits cannot pass."""

from __future__ import annotations

import copy
import re

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


def test_function_under_autocast():
    """Under torch.autocast (CPU, bf16) the backward recomputes each chunk's logits as the forward computed them:
    the gradients' error against fp64 is at most 1.5x the autocast full-logits path's (recomputed without
    autocast: ~10x)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 64, 32, 96
    t = torch.randint(0, V, (N,), generator=g)
    h0, w0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 3  # logits ~17
    errs = {}
    for how in ("full", "chunked", "fp64"):
        h = (h0.double() if how == "fp64" else h0.clone()).requires_grad_()
        w = (w0.double() if how == "fp64" else w0.clone()).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how != "fp64"):
            if how == "chunked":
                loss = chunked_cross_entropy(h, w, None, t, chunk=7)
            else:
                loss = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        errs[how] = (loss, torch.autograd.grad(loss, [h, w]))
    ref = errs.pop("fp64")
    err = {k: max(_rel(a, b) for a, b in zip(v[1], ref[1])) for k, v in errs.items()}
    assert err["chunked"] <= 1.5 * err["full"] and _rel(errs["chunked"][0], errs["full"][0]) < 1e-5, err


def test_function_checks_targets():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(IndexError, match="out of bounds"):
        chunked_cross_entropy(h, w, None, torch.tensor([1, 2, 10, 3]))
    with pytest.raises(IndexError, match="out of bounds"):
        chunked_cross_entropy(h, w, None, torch.tensor([1, -5, 2, 3]))


def test_lazy_logits_in_one_process():
    """LazyLogits (seqpar/passes/lazy_logits.py): metadata without values; reshapes and upcasts stay lazy and give
    the (N, V) rows; any other op calls on_use and runs on the real logits F.linear(h, W, b) (autograd-tracked,
    computed once); after the seal only metadata answers; hidden states changed in place are refused."""
    from seqpar.passes.lazy_logits import LazyForward, LazyLogits

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g).requires_grad_()
    w, b = torch.randn(11, 8, generator=g).requires_grad_(), torch.randn(11, generator=g)
    used: list[str] = []
    fwd = LazyForward(used.append)
    z = LazyLogits.of(fwd, h, w, b, torch.float32)  # (2, 5, 11)
    assert z.shape == (2, 5, 11) and z.size(-1) == 11 and z.dim() == 3 and z.numel() == 110 and len(z) == 2
    assert z.dtype == torch.float32 and z.device == h.device and z.requires_grad and z.is_floating_point()
    rows = z.flatten(0, 1).float().view(10, 11).contiguous()
    assert isinstance(rows, LazyLogits) and rows.shape == (10, 11) and z.rows() is None
    hid, w_, b_ = rows.rows()
    assert hid.shape == (10, 8) and w_ is w and b_ is b
    up = z.reshape(-1, 11).to(torch.float64)
    assert isinstance(up, LazyLogits) and up.dtype == torch.float64 and used == [] and z.logits_computed == 0
    want = F.linear(h, w, b)
    half = z.to(torch.bfloat16)  # a narrowing cast: the real logits
    assert type(half) is torch.Tensor and torch.equal(half, want.to(torch.bfloat16)) and used == ["to"]
    scaled = up * 2  # through the chain
    assert type(scaled) is torch.Tensor and torch.equal(scaled, want.reshape(-1, 11).double() * 2)
    assert z.logits_computed == 1 and used == ["to", "mul"]
    scaled.sum().backward()
    assert torch.allclose(h.grad, 2 * w.sum(0).expand(2, 5, 8))
    fwd.seal()
    assert z.shape == (2, 5, 11) and up.dtype == torch.float64  # metadata still answers
    for use in (lambda: z.sum(), lambda: repr(z), lambda: up.float(), lambda: F.cross_entropy(rows, t)):
        t = torch.zeros(10, dtype=torch.long)
        with pytest.raises(ValueError, match="not computed.*loss='full'"):
            use()
    fwd = LazyForward(used.append)
    z = LazyLogits.of(fwd, h.detach().clone(), w, None, torch.float32)
    z._src.hidden.mul_(2)  # the hidden states changed after lm_head ran
    with pytest.raises(RuntimeError, match="modified in place"):
        z + 1


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
    for ranks, use, layout, fsdp, ckpt, ignore, eps in [c for c in PLAIN_CASES if c[0] == P]:
        what = f"{use} P={P} layout={layout} fsdp={fsdp} checkpoint={ckpt} ignore_index={ignore} smoothing={eps}"
        for res in w.run(lc.plain_lazy, use=use, layout=layout, fsdp=fsdp, checkpoint=ckpt, ignore_index=ignore,
                         label_smoothing=eps):
            assert res["loss"] < 1e-6 and res["grad"] < 1e-5, (what, res)
            assert res["lazy"] and res["computed"] == 0 and res["logs"] == [], (what, res)  # never materialized
            assert res["shape"] == (1, 48 // P, lc.PLAIN_VOCAB) and res["dtype"] == "torch.float32", (what, res)


# plain models under the default loss="auto": (ranks, forward's loss, layout, fsdp, checkpoint, ignore_index,
# label_smoothing); "gpt": seqpar.models.GPT (tied head), "loss": logits.view(-1, V).float() into F.cross_entropy
PLAIN_CASES = [
    (2, "gpt", "zigzag", False, False, -100, 0.0),
    (2, "gpt", "contiguous", True, False, -100, 0.0),
    (2, "loss", "zigzag", False, True, -1, 0.1),
    (4, "gpt", "zigzag", False, False, -100, 0.0),
    (4, "loss", "contiguous", True, True, -1, 0.1),
]


def test_plain_lazy_logits(worlds):
    """Plain models on 2 ranks: logits used besides the loss during the forward are computed whole under "auto"
    (exact, one log line on rank 0) and refused under "chunked"; the logits a forward with labels returns raise
    a ValueError naming loss='full' on any use after the forward (metadata still answers); loss="full" returns
    real logits; compile=True (the blocks compiled) keeps the logits lazy."""
    w = worlds(2)
    sealed = "logits of a forward with labels were not computed.*loss='full'"
    for use in ("softcap", "accuracy"):
        res = w.run(lc.plain_lazy, use=use)
        for r, rank in zip(res, (0, 1)):
            assert r["loss"] < 1e-6 and r["grad"] < 1e-5, (use, r)
            assert r["lazy"] == (use == "accuracy") and r["computed"] == (1 if use == "accuracy" else None), (use, r)
            assert len(r["logs"]) == (1 if rank == 0 else 0), (use, r)
        assert "uses its lm_head logits besides the loss" in res[0]["logs"][0], res[0]
        if use == "accuracy":  # the argmax of the real logits, counted over the ranks
            assert res[0]["correct"][0] == res[0]["correct"][1], res[0]
        for r in w.run(lc.plain_lazy, use=use, loss="chunked"):
            assert r["error"] is not None and "loss='chunked'" in r["error"] and "PlainLM" in r["error"], (use, r)
    for r in w.run(lc.plain_lazy, use="gpt", layout="striped", loss="chunked"):
        assert r["loss"] < 1e-6 and r["grad"] < 1e-5 and r["computed"] == 0, r
        assert r["shape"] == (1, 24, lc.PLAIN_VOCAB) and r["dtype"] == "torch.float32", r  # metadata answers
        assert set(r["after"]) == {"argmax", "repr", "sum", "backward", "float"}, r
        for what, msg in r["after"].items():
            assert msg is not None and re.search(sealed, msg), (what, r)
    for r in w.run(lc.plain_lazy, use="gpt", compile=True):  # compiled blocks; the head stays eager, outside them
        assert r["loss"] < 1e-6 and r["grad"] < 1e-5 and r["computed"] == 0, r
    for r in w.run(lc.plain_lazy, use="gpt", loss="full"):
        assert r["loss"] < 1e-6 and r["grad"] < 1e-5 and not r["lazy"] and r["shape"] == (1, 24, lc.PLAIN_VOCAB), r


def test_memory(worlds):
    """2 ranks, vocab 128000, 2048 local tokens: full local fp32 logits are 1.05 GB; a training step with
    the chunked loss raises the peak resident memory by less than half of that."""
    for res in worlds(2).run(lc.memory, loss="auto", timeout=300):
        assert res["logits_bytes"] >= 1_000_000_000, res
        assert res["rise"] < res["logits_bytes"] / 2, res


def test_plain_memory(worlds):
    """``test_memory`` for a plain model (the seqpar GPT) under the default loss: full local fp32 logits are
    1.05 GB; a training step raises the peak by less than half of that, its logits never computed."""
    for res in worlds(2).run(lc.plain_memory, timeout=300):
        assert res["logits_bytes"] >= 1_000_000_000, res
        assert res["rise"] < res["logits_bytes"] / 2 and res["computed"] == 0, res
