"""Cases for tests/test_fuzz.py (property-based tests): run on every rank of a spawned gloo world.

The pytest side draws a *spec* (plain picklable values) with hypothesis and sends it to one case
function here, which runs it on every rank and returns its outcome:

    ("ok", details)              the call returned; details = its error against the single-device
                                 reference computed on this rank from the full tensors (0.0 = exact;
                                 for attention a ``seqpar.testing.numerics.errors`` dict)
    ("error", type, message)     the call raised ValueError / TypeError
    ("crash", type, message)     anything else (the pytest side fails on it)

The *oracles* (``*_expect``) say, from a spec alone, whether a call is valid on a rank and if not
which arguments an error message may name; both sides use them (the rank side to decide whether it
can build its input as a shard of a full tensor). References never use seqpar: layouts are
rebuilt here from their definitions (``ref_indices``), attention is torch SDPA on the full sequence.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import seqpar
from seqpar.testing import numerics
from seqpar.vocab import BACKENDS, LAYOUTS, METHODS

ATTN_FLOATS = ("float64", "float32", "bfloat16", "float16")  # what seqpar.attention takes
TRITON_RUNS = os.environ.get("TRITON_INTERPRET") == "1"  # else backend='triton' must be refused on CPU


# ----------------------------------------------------------------------------- helpers


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def layout_ok(layout) -> bool:
    return isinstance(layout, str) and layout in LAYOUTS


def unit(layout: str, P: int) -> int:
    return 2 * P if layout == "zigzag" else P


def ref_indices(S: int, rank: int, P: int, layout: str) -> list[int]:
    """The global positions rank ``rank`` holds, from each layout's definition (docs/algorithms.md)."""
    if layout == "contiguous":
        n = S // P
        return list(range(rank * n, (rank + 1) * n))
    if layout == "striped":
        return [i for i in range(S) if i % P == rank]
    c = S // (2 * P)  # zigzag: 2P chunks, rank r holds chunks r and 2P-1-r
    return [ch * c + j for ch in (rank, 2 * P - 1 - rank) for j in range(c)]


def make_tensor(shape, dtype: str, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    if dt == torch.bool:
        t = torch.rand(tuple(shape), generator=g) < 0.5
    elif dt.is_floating_point or dt.is_complex:
        t = torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dt)
    else:
        t = torch.randint(-50 if dt != torch.uint8 else 0, 100, tuple(shape), generator=g).to(dt)
    return t.to(device) if device != "cpu" else t


def _mine(spec: dict, rank: int) -> dict:
    """This rank's spec: the shared one with this rank's overrides (``per_rank`` {rank: {...}})."""
    return {**spec, **spec.get("per_rank", {}).get(rank, {})}


def _run(fn):
    """Call ``fn`` and turn the outcome into a plain tuple."""
    try:
        return ("ok", fn())
    except (TypeError, ValueError) as e:
        return ("error", type(e).__name__, str(e))
    except Exception as e:  # noqa: BLE001 - a crash is a finding, reported to the pytest side
        return ("crash", type(e).__name__, f"{e}\n{traceback.format_exc()}")


def _exact(got: torch.Tensor, want: torch.Tensor) -> float:
    """0.0 when ``got`` equals ``want`` exactly (shape, dtype, values; meta: shape and dtype), else inf."""
    if got.shape != want.shape or got.dtype != want.dtype or got.device.type != want.device.type:
        return math.inf
    if got.device.type == "meta":
        return 0.0
    return 0.0 if torch.equal(got, want) else math.inf


# ----------------------------------------------------------------------------- shard / unshard / positions


def _shard_like_expect(s: dict, arg: str, bad_length) -> list[str]:
    """The names a shard / unshard error may give: ``arg`` (the tensor's name) for a bad tensor or a
    length ``bad_length(n)`` refuses, ``layout``, ``dim``."""
    names = []
    if s["x_kind"] != "tensor":
        names.append(arg)
    if not layout_ok(s["layout"]):
        names.append("layout")
    dim, shape = s["dim"], s["shape"]
    if not is_int(dim):
        names.append("dim")
    elif s["x_kind"] == "tensor":
        if len(shape) == 0:
            names.append(arg)
        elif not -len(shape) <= dim < len(shape):
            names.append("dim")
        elif shape[dim] == 0 or bad_length(shape[dim]):
            names.append(arg)
    return names


def shard_expect(s: dict, P: int):
    """None if ``seqpar.shard`` must succeed, else the names an error may give."""
    names = _shard_like_expect(s, "x", lambda n: layout_ok(s["layout"]) and n % unit(s["layout"], P))
    return tuple(names) or None


def unshard_expect(s: dict, P: int):
    """Local validity of ``seqpar.unshard`` on one rank: None, or the names its error may give."""
    names = _shard_like_expect(s, "local", lambda n: s["layout"] == "zigzag" and n % 2)
    if s["x_kind"] == "tensor" and s["device"] == "meta":
        names.append("local")
    return tuple(names) or None


def unshard_signature(s: dict):
    """What every rank must agree on for unshard: (ndim, dim, layout, dtype, shape)."""
    nd = len(s["shape"])
    return nd, s["dim"] % nd, s["layout"], s["dtype"], tuple(s["shape"])


def positions_expect(s: dict, P: int):
    names = []
    n = s["seq_len"]
    if not is_int(n) or n < 1:
        names.append("seq_len")
    if not layout_ok(s["layout"]):
        names.append("layout")
    elif is_int(n) and n >= 1 and n % unit(s["layout"], P):
        names.append("seq_len")
    dev = s["device"]
    if dev is not None and not (dev in ("cpu", "meta") or (isinstance(dev, torch.device) and dev.type == "cpu")
                                or (dev in ("cuda", 0) and torch.cuda.is_available())):
        names.append("device")
    return tuple(names) or None


def sharding(rank: int, size: int, *, op: str, spec: dict):
    """One call of ``seqpar.shard`` / ``unshard`` / ``positions`` on this rank -> outcome tuple."""
    s = _mine(spec, rank)
    if op == "positions":
        def call():
            got = seqpar.positions(s["seq_len"], layout=s["layout"], device=s["device"])
            dev = "meta" if s["device"] == "meta" else "cpu"
            want = torch.tensor(ref_indices(s["seq_len"], rank, size, s["layout"]), dtype=torch.long, device=dev)
            return _exact(got, want)
        return _run(call)

    shape, dtype, seed = s["shape"], s["dtype"], s["seed"]
    if op == "shard":
        x = make_tensor(shape, dtype, seed, s["device"]) if s["x_kind"] == "tensor" else s["x_kind"]

        def call():
            got = seqpar.shard(x, dim=s["dim"], layout=s["layout"])
            d = s["dim"] % x.ndim  # reached only if shard accepted dim (then it must be in range)
            idx = torch.tensor(ref_indices(x.shape[d], rank, size, s["layout"]), dtype=torch.long)
            if x.device.type == "meta":
                want = torch.empty(*(len(idx) if i == d else n for i, n in enumerate(x.shape)), dtype=x.dtype,
                                   device="meta")
            else:
                want = x.index_select(d, idx)
            return _exact(got, want)
        return _run(call)

    assert op == "unshard", op
    full = local = None
    if unshard_expect(s, size) is None:  # a valid local shard: cut it from a full tensor (same on every rank)
        d = s["dim"] % len(shape)
        S = shape[d] * size
        full = make_tensor([S if i == d else n for i, n in enumerate(shape)], dtype, seed)
        local = full.index_select(d, torch.tensor(ref_indices(S, rank, size, s["layout"]), dtype=torch.long))
    elif s["x_kind"] == "tensor":
        local = make_tensor(shape, dtype, seed + rank, s["device"])
    else:
        local = s["x_kind"]
    grads = isinstance(local, torch.Tensor) and local.dtype.is_floating_point and local.device.type != "meta"
    if grads:
        local = local.detach().requires_grad_()

    def call():
        got = seqpar.unshard(local, dim=s["dim"], layout=s["layout"])
        err = _exact(got.detach(), full)
        if grads and err == 0.0:  # backward: this rank's slice of the incoming gradient
            w = make_tensor(full.shape, dtype, seed + 1)
            got.backward(w)
            d = s["dim"] % local.ndim
            want = w.index_select(d, torch.tensor(ref_indices(full.shape[d], rank, size, s["layout"])))
            err = max(err, _exact(local.grad, want))
        return err
    return _run(call)


# ----------------------------------------------------------------------------- attention


def attention_expect(s: dict, P: int):
    """Local validity of ``seqpar.attention`` on one rank: None, or the names its error may give."""
    names = []
    if s["q_kind"] != "tensor":
        names.append("q")
    if s["dtype"] not in ATTN_FLOATS:
        names.append("q")
    if s["Hq"] % s["Hkv"]:
        names += ["q", "k", "heads"]
    elif s["Hq"] != s["Hkv"] and s["gqa"] is not True:
        names.append("enable_gqa")
    if not isinstance(s["causal"], bool):
        names.append("is_causal")
    sc = s["scale"]
    if sc is not None and not (isinstance(sc, (int, float)) and not isinstance(sc, bool) and math.isfinite(sc)):
        names.append("scale")
    for name, choices in (("layout", LAYOUTS), ("method", METHODS), ("backend", BACKENDS)):
        if not (isinstance(s[name], str) and s[name] in choices):
            names.append(name)
    if s["backend"] == "triton" and not TRITON_RUNS:
        names.append("backend")
    if s["layout"] == "zigzag" and s["S_local"] % 2:
        names += ["layout", "pad"]
    if s["method"] == "ulysses" and (s["Hq"] % P or (s["Hkv"] % P and P % s["Hkv"])):
        names += ["Hq", "Hkv", "method", "heads"]  # ulysses splits heads over the group: Hq % P, Hkv % P or P % Hkv
    return tuple(names) or None


def attention_signature(s: dict):
    return s["B"], s["Hq"], s["S_local"], s["D"], s["Hkv"], s["dtype"], s["causal"], s["layout"], s["method"]


_GROUPS: dict = {}


def _group(kind: str):
    """``"world"``: the default group. ``"disagree"``: a group of all ranks only ever used by calls that
    must fail (so no signature is ever agreed on it; see test_fuzz's cached-agreement test)."""
    if kind == "world":
        return None
    if kind not in _GROUPS:
        _GROUPS[kind] = dist.new_group(list(range(dist.get_world_size())))
    return _GROUPS[kind]


def _sdpa_grads(q, k, v, do, *, causal, scale, gqa):
    """[out, dq, dk, dv] of torch SDPA in the inputs' dtype (the bound's yardstick). The causal mask is
    passed as a boolean mask: torch's CPU SDPA returns NaN for is_causal=True with scale <= 0."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool).tril() if causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def _math_grads(q, k, v, do, *, causal, scale):
    """The truth: [out, dq, dk, dv] of plain masked-softmax attention in fp64 (no SDPA kernel)."""
    q, k, v = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[-3] // k.shape[-3]
    kk, vv = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ kk.transpose(-1, -2)) * sc
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    out = torch.softmax(s, dim=-1) @ vv
    out.backward(do.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def _errors(mine, truth, low):
    if any(t.numel() == 0 for t in truth):  # B = 0: nothing to compare, but the shapes must match
        bad = any(m.shape != t.shape for m, t in zip(mine, truth))
        return {n: dict(seqpar=math.inf if bad else 0.0, sdpa=0.0, scale=0.0) for n in numerics.NAMES}
    return numerics.errors(mine, truth, low)


def attention(rank: int, size: int, *, spec: dict):
    """One forward + backward of ``seqpar.attention`` on this rank's shards -> outcome tuple;
    ok details: ``numerics.errors`` of out, dq, dk, dv vs fp64 attention on the full sequence (and torch
    SDPA in the same dtype for the bound)."""
    s = _mine(spec, rank)
    group = _group(s.get("group", "world"))
    B, Hq, Hkv, Sl, D, seed = s["B"], s["Hq"], s["Hkv"], s["S_local"], s["D"], s["seed"]
    dt = getattr(torch, s["dtype"])
    valid = attention_expect(s, size) is None
    S = Sl * size
    g = torch.Generator().manual_seed(seed)

    def rnd(h, n):
        if s["transposed"]:  # (B, S, H, D) storage seen as (B, H, S, D), as Hugging Face passes it
            return torch.randn(B, n, h, D, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, h, n, D, generator=g, dtype=torch.float64)

    sh = None
    if valid:
        q, k, v, do = rnd(Hq, S), rnd(Hkv, S), rnd(Hkv, S), rnd(Hq, S)
        idx = torch.tensor(ref_indices(S, rank, size, s["layout"]), dtype=torch.long)
        sh = lambda t: t.index_select(2, idx)  # noqa: E731
        ql, kl, vl = (sh(t).to(dt).requires_grad_() for t in (q, k, v))
    else:
        ql, kl, vl = (rnd(h, Sl).to(dt) for h in (Hq, Hkv, Hkv))
        if s["q_kind"] != "tensor":
            ql = ql.tolist()

    def call():
        out = seqpar.attention(ql, kl, vl, group=group, is_causal=s["causal"], scale=s["scale"],
                               enable_gqa=s["gqa"], layout=s["layout"], method=s["method"], backend=s["backend"])
        if sh is None:  # accepted input the oracle calls invalid: the pytest side reports it
            return {"accepted": dict(seqpar=math.inf, sdpa=0.0, scale=0.0)}
        if out.shape != ql.shape or out.dtype != dt:
            return {"shape": dict(seqpar=math.inf, sdpa=0.0, scale=0.0)}
        out.backward(sh(do).to(dt))
        gqa = Hq != Hkv
        ref = _math_grads(q, k, v, do, causal=s["causal"], scale=s["scale"])  # fp64 truth
        low = _sdpa_grads(*(t.to(dt) for t in (q, k, v, do)), causal=s["causal"], scale=s["scale"], gqa=gqa)
        mine = [out.detach(), ql.grad, kl.grad, vl.grad]
        return _errors(mine, [sh(r) for r in ref], [sh(lo) for lo in low])
    return _run(call)


def attention_on_meta(rank: int, size: int):
    """q, k, v on the meta device (shapes without data)."""
    x = torch.empty(1, 2, 4, 8, device="meta")
    return _run(lambda: tuple(seqpar.attention(x, x, x, is_causal=True).shape))


def attention_calls(rank: int, size: int, *, calls: list[dict]):
    """Several attention calls in a row on the default group (outcome of each)."""
    res = []
    for spec in calls:
        s = _mine(spec, rank)
        x = torch.randn(1, 2, s["S_local"], 8)
        q = x.tolist() if s.get("q_kind", "tensor") != "tensor" else x.to(getattr(torch, s.get("dtype", "float32")))
        res.append(_run(lambda: tuple(seqpar.attention(q, x, x, is_causal=True, layout="striped").shape)))
    return res


# ----------------------------------------------------------------------------- shard_batch / parallelize

_MESHES: dict = {}


def _meshes(size: int) -> dict:
    """Every mesh the cases use, built once per world on all ranks (building a mesh is collective)."""
    if not _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES["cp"] = init_device_mesh("cpu", (size,), mesh_dim_names=("cp",))
        _MESHES["dp_cp"] = seqpar.init_mesh(cp=size)  # 2-D (dp=1, cp=size)
        _MESHES["dp_only"] = init_device_mesh("cpu", (size,), mesh_dim_names=("dp",))
        if size == 4:
            _MESHES["dp2_cp2"] = seqpar.init_mesh(cp=2, dp=2)
    return _MESHES


def mesh_cp(kind: str, P: int):
    """The cp size of a good mesh kind, None for a bad one."""
    return {"cp": P, "dp_cp": P, "dp2_cp2": 2}.get(kind)


def _resolve_mesh(kind: str, size: int):
    meshes = _meshes(size)
    if kind in meshes:
        return meshes[kind]
    return {"group": dist.group.WORLD, "none": None, "str": "cp", "int": size}[kind]


INT_DTYPES = ("int64", "int32", "int16", "uint8", "int8")


def shard_batch_expect(s: dict, P: int):
    names = []
    cp = mesh_cp(s["mesh"], P)
    if cp is None:
        return ("mesh",)  # checked first; everything else needs cp
    if not layout_ok(s["layout"]):
        return ("layout",)
    if s["batch_kind"] != "dict":
        return ("batch",)
    if not (isinstance(s["ignore_index"], int) and not isinstance(s["ignore_index"], bool)):
        names.append("ignore_index")
    if s["extra_key"]:
        names.append("batch")
    B, S = s["B"], s["S"]
    if s["ids"] == "missing":
        names.append("input_ids")
    elif s["ids"] != "BS" or s["ids_dtype"] not in INT_DTYPES or S == 0:
        names.append("input_ids")
    elif S % unit(s["layout"], cp):
        names += ["batch", "pad"]
    for key, ok_kinds in (("labels", ("none", "BS")), ("position_ids", ("none", "BS", "1S", "S")),
                          ("attention_mask", ("none", "BS"))):
        if s[key] not in ok_kinds:
            names.append(key)
    if s["mask_zeros"] and s["attention_mask"] == "BS":
        names.append("attention_mask")
    if s["meta"]:
        names.append("input_ids")
    return tuple(names) or None


def _batch_tensor(kind: str, B: int, S: int, seed: int, *, dtype="int64", low=0, high=64):
    g = torch.Generator().manual_seed(seed)
    shape = {"BS": (B, S), "1S": (1, S), "S": (S,), "B1": (B, max(S - 1, 0)), "B+1S": (B + 1, S),
             "3d": (B, S, 2), "1d": (S,)}[kind]
    t = torch.randint(low, high, shape, generator=g)
    if dtype == "float":
        return t.float()
    return t.to(getattr(torch, dtype))


def shard_batch(rank: int, size: int, *, spec: dict):
    """``seqpar.shard_batch`` of a drawn batch -> outcome; ok details 0.0 if every output equals the
    independent reference (keys, values, dtypes), else inf."""
    s = spec
    mesh = _resolve_mesh(s["mesh"], size)
    B, S, seed = s["B"], s["S"], s["seed"]
    batch: dict = {}
    if s["ids"] != "missing":
        batch["input_ids"] = _batch_tensor({"BS": "BS", "1d": "1d", "3d": "3d"}[s["ids"]], B, S, seed,
                                           dtype=s["ids_dtype"] if s["ids_dtype"] != "float32" else "float")
        if s["ids_dtype"] == "bool":
            batch["input_ids"] = batch["input_ids"] > 30
    if s["labels"] != "none":
        kind = "BS" if s["labels"] in ("BS", "float") else s["labels"]
        lab = _batch_tensor(kind, B, S, seed + 1)
        ignored = torch.rand(lab.shape, generator=torch.Generator().manual_seed(seed + 2)) < 0.3
        lab[ignored] = s["ignore_index"] if is_int(s["ignore_index"]) else -100
        batch["labels"] = lab.float() if s["labels"] == "float" else lab
    if s["position_ids"] != "none":
        kind = "BS" if s["position_ids"] == "float" else s["position_ids"]
        # increasing along the sequence (positions that restart mark packed documents, refused by
        # shard_batch: tested in test_parallelize's bad input)
        pos = _batch_tensor(kind, B, S, seed + 3, high=1000).sort(dim=-1).values if S else \
            _batch_tensor(kind, B, S, seed + 3, high=1000)
        batch["position_ids"] = pos.float() if s["position_ids"] == "float" else pos
    if s["attention_mask"] != "none":
        m = torch.ones(_batch_tensor(s["attention_mask"], B, S, 0).shape, dtype=torch.long)
        if s["mask_zeros"] and m.numel():
            m.view(-1)[-1] = 0
        batch["attention_mask"] = m
    if s["extra_key"]:
        batch["token_type_ids"] = torch.zeros(B, S, dtype=torch.long)
    if s["meta"]:
        batch = {k: v.to("meta") for k, v in batch.items()}
    arg = batch if s["batch_kind"] == "dict" else list(batch.values())

    def call():
        got = seqpar.shard_batch(arg, mesh, layout=s["layout"], ignore_index=s["ignore_index"])
        cp_rank = mesh["cp"].get_local_rank() if mesh.ndim == 2 else mesh.get_local_rank()
        cp = mesh_cp(s["mesh"], size)
        idx = torch.tensor(ref_indices(S, cp_rank, cp, s["layout"]), dtype=torch.long)
        ids = batch["input_ids"]
        want = {"input_ids": ids[:, idx]}
        pos = batch.get("position_ids")
        pos = torch.arange(S).expand(B, S) if pos is None else pos.expand(B, S)
        want["position_ids"] = pos[:, idx]
        if "labels" in batch:
            ign = s["ignore_index"]
            lab = batch["labels"]
            target = torch.cat([lab[:, 1:], torch.full((B, 1), ign, dtype=lab.dtype)], dim=1)
            want["labels"] = want["shift_labels"] = target[:, idx]
            want["num_items_in_batch"] = (target != ign).sum()
        if set(got) != set(want):
            return math.inf
        return max(_exact(got[k], want[k]) for k in want)
    return _run(call)


class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


def parallelize_expect(s: dict, P: int):
    names = []
    if mesh_cp(s["mesh"], P) is None:
        return ("mesh",)
    for name, choices in (("layout", LAYOUTS), ("method", METHODS)):
        if not (isinstance(s[name], str) and s[name] in choices):
            names.append(name)
    for name in ("fsdp", "checkpoint", "compile"):
        if not isinstance(s.get(name, False), bool):
            names.append(name)
    if s["model"] != "gpt":
        names.append("model")
    if names:
        return tuple(names)
    # the backend is checked by seqpar.attention at the first forward (or by parallelize, see the report)
    if not (isinstance(s["backend"], str) and s["backend"] in BACKENDS) or (s["backend"] == "triton"
                                                                            and not TRITON_RUNS):
        return ("backend",)
    return None


def parallelize(rank: int, size: int, *, spec: dict):
    """``seqpar.parallelize`` + one forward/backward of a sharded batch -> outcome; ok details: the
    largest relative errors ``{"loss": .., "grad": ..}`` vs the unmodified model on the full batch."""
    import parallel_cases as pc

    s = spec
    mesh = _resolve_mesh(s["mesh"], size)
    model = {"gpt": lambda: pc.make_model("gpt"), "no_attention": _NoAttention,
             "mha": lambda: nn.ModuleList([nn.MultiheadAttention(8, 2)]), "not_module": lambda: "gpt"}[s["model"]]()
    ref = copy.deepcopy(model) if isinstance(model, nn.Module) else None

    def call():
        m = seqpar.parallelize(model, mesh, layout=s["layout"], method=s["method"], fsdp=s["fsdp"],
                               checkpoint=s["checkpoint"], compile=s["compile"], backend=s["backend"])
        cp = mesh_cp(s["mesh"], size)
        dp = size // cp
        replica = mesh["dp"].get_local_rank() if mesh.ndim == 2 else 0
        batches = [pc.make_batch(d, 1, 8 * s["S_units"] * unit(s["layout"], cp)) for d in range(dp)]
        ref_losses = [pc.reference_loss("gpt", ref, b) for b in batches]
        (sum(ref_losses) / dp).backward()
        loss = m(**seqpar.shard_batch(batches[replica], mesh, layout=s["layout"])).loss
        loss.backward()
        err = {"loss": pc._rel(loss.detach(), ref_losses[replica].detach()), "grad": 0.0}
        got = dict(m.named_parameters())
        for name, p in ref.named_parameters():
            err["grad"] = max(err["grad"], pc._rel(pc._full(got[name].grad), p.grad))
        return err
    return _run(call)


def parallelize_only(rank: int, size: int, *, backend):
    """Only the ``seqpar.parallelize`` call (no forward) with ``backend``."""
    import parallel_cases as pc

    mesh = _resolve_mesh("cp", size)
    return _run(lambda: type(seqpar.parallelize(pc.make_model("gpt"), mesh, fsdp=False, backend=backend)).__name__)
