"""Cases for tests/test_fsdp_options.py (FSDP2's memory options through parallelize), run on every rank.

References are single-process runs of the unmodified model (parallel_cases.make_model / reference_loss):
in fp32, and for precision="bf16" / "fp16" also the same model cast to that dtype, whose own error
against fp32 is the yardstick of the mixed-precision run's. Besides the numbers each case reports what
it observed of the option itself: parameter and input dtypes inside a block's forward, the dtypes of
FSDP's collectives, whether a block's parameters are sharded after forward, FSDP's offload flags.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import seqpar
from parallel_cases import _full, _rel, make_batch, make_model, mesh_for, reference_loss
from seqpar.passes.check import find_blocks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_reduce")  # FSDP2's (and the loss pass's all_reduce)


class _Spy:
    """Records (name, dtype) of FSDP's collectives while active (torch.distributed functions patched)."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()
        self.real = {n: getattr(dist, n) for n in COLLECTIVES}

    def __enter__(self):
        for n, f in self.real.items():
            def spy(*args, _n=n, _f=f, **kwargs):
                t = next((kwargs[k] for k in ("input", "input_tensor") if k in kwargs), None)
                t = t if t is not None else (args[1] if len(args) > 1 else args[0])
                self.seen.add((_n, str(t.dtype).replace("torch.", "")))
                return _f(*args, **kwargs)
            setattr(dist, n, spy)
        return self

    def __exit__(self, *exc):
        for n, f in self.real.items():
            setattr(dist, n, f)


def _first_float(args, kwargs):
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    return None


def _train(kind, model, batches, mesh, replica, layout, steps, lr, observe=None):
    """Losses of every step, (name -> full gradient) of step 0, (name -> full parameter) at the end."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, grads = [], {}
    for step in range(steps):
        opt.zero_grad()
        loss = model(**seqpar.shard_batch(batches[step][replica], mesh, layout=layout)).loss
        if observe is not None and step == 0:
            observe(model)
        loss.backward()
        losses.append(loss.detach().float())
        if step == 0:
            grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
        opt.step()
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    return losses, grads, params


def _reference(kind, ref, batches, dp, steps, lr):
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    losses, grads = [], {}
    for step in range(steps):
        ls = [reference_loss(kind, ref, b) for b in batches[step]]
        opt.zero_grad()
        (sum(ls) / dp).backward()
        losses.append([x.detach().float() for x in ls])
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
        opt.step()
    return losses, grads, {n: p.detach().clone() for n, p in ref.named_parameters()}


def _errors(got, want, replica) -> dict:
    losses, grads, params = got
    wl, wg, wp = want
    return dict(loss=max(_rel(a, b[replica]) for a, b in zip(losses, wl)),
                grad=max(_rel(grads[n], g) for n, g in wg.items()),
                param=max(_rel(params[n], p) for n, p in wp.items()), ngrads=len(wg))


def options_case(rank, size, *, kind, dp, cp, precision, reshard, fsdp_offload, layout="zigzag", checkpoint=False,
                 B=2, S=64, steps=2, lr=0.5):
    """parallelize(fsdp=True, precision, reshard, fsdp_offload) vs the single process: the errors
    ``err`` against fp32 (and, under mixed precision, ``low``: the single-process model cast to the
    compute dtype, against fp32); what the option did (``seen``); for reshard="keep", ``same``: the
    largest difference to the same run with reshard="after_forward" (expected 0: same math)."""
    mesh = mesh_for(dp, cp)
    replica = mesh.get_local_rank("dp")
    batches = [[make_batch(d, B, S, step) for d in range(dp)] for step in range(steps)]
    ref = make_model(kind)
    start = copy.deepcopy(ref)
    want = _reference(kind, ref, batches, dp, steps, lr)
    seen: dict = {}

    def observe(model):  # after the first forward, before its backward
        block = find_blocks(model)[0]
        p = next(block.parameters())
        seen["block_after_forward"] = "sharded" if hasattr(p, "full_tensor") else "unsharded"
        p = next(model.parameters())  # the root's (embedding)
        seen["root_after_forward"] = "sharded" if hasattr(p, "full_tensor") else "unsharded"

    def parallel(reshard_mode):
        model = seqpar.parallelize(copy.deepcopy(start), mesh, layout=layout, fsdp=True, checkpoint=checkpoint,
                                   precision=precision, reshard=reshard_mode, fsdp_offload=fsdp_offload)
        return model

    model = parallel(reshard)
    block = find_blocks(model)[0]

    def pre_hook(mod, args, kwargs):
        p = next(mod.parameters())
        x = _first_float(args, kwargs)
        seen.setdefault("param_in_forward", str(p.dtype).replace("torch.", ""))
        seen.setdefault("input_in_forward", None if x is None else str(x.dtype).replace("torch.", ""))

    block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    # FSDP's own record of the options (private state, read only to prove the option reached FSDP)
    group = block._get_fsdp_state()._fsdp_param_group
    fp = group.fsdp_params[0]
    seen["mp_param_dtype"] = str(group.mp_policy.param_dtype).replace("torch.", "")
    seen["mp_reduce_dtype"] = str(group.mp_policy.reduce_dtype).replace("torch.", "")
    seen["offload_to_cpu"], seen["pin_memory"] = fp.offload_to_cpu, fp.pin_memory
    with _Spy() as spy:
        got = _train(kind, model, batches, mesh, replica, layout, steps, lr, observe)
    seen["collectives"] = sorted(spy.seen)
    seen["grad_dtype"] = str(next(iter(got[1].values())).dtype).replace("torch.", "")
    seen["grad_device"] = str(next(model.parameters()).grad.to_local().device)
    res = dict(err=_errors(got, want, replica), seen=seen)
    if precision != "fp32":  # the single-process model in the compute dtype: its own error against fp32
        low_model = copy.deepcopy(start).to(DTYPES[precision])
        low = _reference(kind, low_model, batches, dp, steps, lr)
        low = ([[x.float() for x in ls] for ls in low[0]], {n: g.float() for n, g in low[1].items()},
               {n: p.float() for n, p in low[2].items()})
        res["low"] = _errors(([ls[replica] for ls in low[0]], low[1], low[2]), want, replica)
    if reshard == "keep":
        other = _train(kind, parallel("after_forward"), batches, mesh, replica, layout, steps, lr)
        res["same"] = max([(a - b).abs().max().item() for a, b in zip(got[0], other[0])]
                          + [(got[1][n] - other[1][n]).abs().max().item() for n in got[1]]
                          + [(got[2][n] - other[2][n]).abs().max().item() for n in got[2]])
    return res


BAD = {  # case -> parallelize keywords (on the GPT model unless "model" says otherwise)
    "bf16_without_fsdp": dict(fsdp=False, precision="bf16"),
    "keep_without_fsdp": dict(fsdp=False, reshard="keep"),
    "offload_without_fsdp": dict(fsdp=False, fsdp_offload="cpu"),
    "unknown_precision": dict(precision="int8"),
    "dtype_precision": dict(precision=torch.bfloat16),
    "bool_reshard": dict(reshard=True),
    "unknown_reshard": dict(reshard="never"),
    "bool_offload": dict(fsdp_offload=True),
    "unknown_offload": dict(fsdp_offload="nvme"),
    "bf16_model_bf16": dict(precision="bf16", model="bf16"),
}


def bad_options(rank, size, *, case):
    """(exception type name, message, collectives called) of a bad parallelize call made on every rank;
    torch.distributed's collectives are patched to record (and refuse) any call."""
    kw = dict(BAD[case])
    model = make_model("gpt")
    if kw.pop("model", None) == "bf16":
        model = model.to(torch.bfloat16)
    mesh = mesh_for(2, 2)
    called: list[str] = []
    names = ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "barrier", "batch_isend_irecv", "all_gather_object", "broadcast_object_list", "new_group")
    real = {n: getattr(dist, n) for n in names}

    def refuse(name):
        def f(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} called before the options were checked")
        return f

    for n in names:
        setattr(dist, n, refuse(n))
    try:
        seqpar.parallelize(model, mesh, **kw)
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e), called
    finally:
        for n, f in real.items():
            setattr(dist, n, f)
    return None, None, called
