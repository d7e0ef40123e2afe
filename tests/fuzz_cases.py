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
from seqpar.vocab import BACKENDS, LAYOUTS, METHOD_CHOICES

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


def unshard_signature(s: dict, P: int):
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
    for name, choices in (("layout", LAYOUTS), ("method", METHOD_CHOICES), ("backend", BACKENDS)):
        if not (isinstance(s[name], str) and s[name] in choices):
            names.append(name)
    if s["backend"] == "triton" and not TRITON_RUNS:
        names.append("backend")
    if s["layout"] == "zigzag" and s["S_local"] % 2:
        names += ["layout", "pad"]
    if s["method"] == "ulysses" and (s["Hq"] % P or (s["Hkv"] % P and P % s["Hkv"])):
        names += ["Hq", "Hkv", "method", "heads"]  # ulysses splits heads over the group: Hq % P, Hkv % P or P % Hkv
    if s["method"] == "hybrid":
        if s.get("group", "world") != "hybrid":  # hybrid needs the mesh of init_mesh(cp, ulysses=U) as group
            names.append("group")
        elif s["Hq"] % P or (s["Hkv"] % P and P % s["Hkv"]):  # the "hybrid" mesh: U = P (see hybrid_ulysses)
            names += ["Hq", "Hkv"]
    names += mask_expect(s, s["S_local"] * P)
    return tuple(names) or None


def mask_expect(s: dict, S: int) -> list[str]:
    """The mask arguments of attention (window_size, softcap, cu_seqlens) that are bad, from their
    definitions: window entries ints >= -1 (not bools), softcap a finite number >= 0, cu_seqlens a 1-D
    integer tensor or a list of ints [0, ..., S] strictly increasing (S: the global length)."""
    names = []
    w = s.get("window", (-1, -1))
    if not (isinstance(w, (tuple, list)) and len(w) == 2 and all(is_int(x) for x in w) and min(w) >= -1):
        names.append("window_size")
    sc = s.get("softcap", 0.0)
    if not (isinstance(sc, (int, float)) and not isinstance(sc, bool) and math.isfinite(sc) and sc >= 0):
        names.append("softcap")
    cu = s.get("cu")
    if cu is not None:
        vals = cu["values"]
        if cu["as"] == "tensor":
            ok = cu["ndim"] == 1 and cu["dtype"] in ("int64", "int32", "int16", "uint8")
        else:
            ok = cu["as"] == "list" and all(is_int(x) for x in vals)
        if not (ok and len(vals) >= 2 and vals[0] == 0 and vals[-1] == S
                and all(b > a for a, b in zip(vals, vals[1:]))):
            names.append("cu_seqlens")
    return names


def mask_key(s: dict, S: int) -> tuple:
    """What the ranks must agree on of a valid mask, as the documented mask means it: a window side that
    reaches every key (>= S - 1) is no window, the right side is moot under is_causal, one document
    [0, S] is no documents."""
    left, right = (int(x) for x in s.get("window", (-1, -1)))
    left = -1 if left >= S - 1 else left
    right = -1 if right >= S - 1 or s["causal"] is True else right
    cu = s.get("cu")
    docs = None if cu is None or list(cu["values"]) == [0, S] else tuple(int(x) for x in cu["values"])
    return left, right, float(s.get("softcap", 0.0)), docs


def attention_signature(s: dict, P: int):
    return (s["B"], s["Hq"], s["S_local"], s["D"], s["Hkv"], s["dtype"], s["causal"], s["layout"], s["method"],
            mask_key(s, s["S_local"] * P))


def hybrid_ulysses(P: int) -> int:
    """The ulysses degree of the "hybrid" group of the attention fuzz: init_mesh(cp=P, ulysses=P)."""
    return P


_GROUPS: dict = {}


def _group(kind: str):
    """``"world"``: the default group. ``"disagree"``: a group of all ranks only ever used by calls that
    must fail (so no signature is ever agreed on it; see test_fuzz's cached-agreement test). ``"hybrid"``:
    the mesh of ``seqpar.init_mesh(cp=P, ulysses=hybrid_ulysses(P))`` (method="hybrid"'s group)."""
    if kind == "world":
        return None
    if kind not in _GROUPS:
        size = dist.get_world_size()
        _GROUPS[kind] = (seqpar.init_mesh(cp=size, ulysses=hybrid_ulysses(size)) if kind == "hybrid"
                         else dist.new_group(list(range(size))))
    return _GROUPS[kind]


def visibility(S: int, causal: bool, window=(-1, -1), cu=None) -> torch.Tensor:
    """(S, S) bool, query i sees key j, from the definitions: causal j <= i; window i - left <= j <= i + right
    (-1: that side unbounded); documents: i and j in the same [cu[d], cu[d+1])."""
    vis = torch.zeros(S, S, dtype=torch.bool)
    left, right = (int(x) for x in window)
    doc = [0] * S
    if cu is not None:
        for d in range(len(cu) - 1):
            for i in range(int(cu[d]), int(cu[d + 1])):
                doc[i] = d
    for i in range(S):
        for j in range(S):
            vis[i, j] = ((not causal or j <= i) and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
                         and doc[i] == doc[j])
    return vis


def _sdpa_grads(q, k, v, do, *, vis, scale, gqa, softcap=0.0):
    """[out, dq, dk, dv] of single-device attention in the inputs' dtype (the bound's yardstick): torch SDPA
    with the visibility ``vis`` as a boolean mask (also for the causal mask: torch's CPU SDPA returns NaN
    for is_causal=True with scale <= 0). SDPA has no soft-cap: with one, the same attention as the truth
    computed in fp32 (fp64 for fp64) on the inputs in their dtype, rounded to it, as SDPA's CPU kernels do."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if not softcap:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scale, enable_gqa=gqa)
        out.backward(do)
        return [out.detach(), q.grad, k.grad, v.grad]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = _attend_math(q.to(acc), k.to(acc), v.to(acc), vis=vis, scale=scale, softcap=softcap).to(q.dtype)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def _attend_math(q, k, v, *, vis, scale, softcap):
    """Plain attention: scores q k^T * scale (1/sqrt(D) if None), soft-capped softcap * tanh(s / softcap)
    when softcap, masked to ``vis``, softmax, times v (GQA by repeating k / v heads)."""
    rep = q.shape[-3] // k.shape[-3]
    kk, vv = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ kk.transpose(-1, -2)) * sc
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~vis, -math.inf)
    return torch.softmax(s, dim=-1) @ vv


def _math_grads(q, k, v, do, *, causal, scale, vis=None, softcap=0.0):
    """The truth: [out, dq, dk, dv] of plain masked-softmax attention in fp64 (no SDPA kernel); ``vis``
    (default: causal or full) the (S, S) visibility, ``softcap`` the logit soft-cap."""
    q, k, v = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    if vis is None:
        vis = visibility(q.shape[-2], causal)
    out = _attend_math(q, k, v, vis=vis, scale=scale, softcap=softcap)
    out.backward(do.double())
    return [out.detach(), q.grad, k.grad, v.grad]


def mask_args(s: dict) -> dict:
    """The drawn mask arguments as seqpar.attention takes them (the spec holds plain values)."""
    cu = s.get("cu")
    if cu is not None:
        vals = cu["values"]
        if cu["as"] == "tensor":
            dt = getattr(torch, cu["dtype"])
            cu = torch.tensor([float(x) for x in vals]).to(dt) if dt.is_floating_point or dt == torch.bool \
                else torch.tensor([int(x) for x in vals], dtype=dt)
            cu = cu[None] if s["cu"]["ndim"] == 2 else cu
        elif cu["as"] == "numpy":  # a numpy array: neither a tensor nor a list
            cu = np.array(vals)
        else:
            cu = [np.int64(x) if i % 2 and is_int(x) else x for i, x in enumerate(vals)]  # numpy ints are ints
    return dict(window_size=s.get("window", (-1, -1)), cu_seqlens=cu, softcap=s.get("softcap", 0.0))


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
    masks = mask_args(s)
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
                               enable_gqa=s["gqa"], layout=s["layout"], method=s["method"], backend=s["backend"],
                               **masks)
        if sh is None:  # accepted input the oracle calls invalid: the pytest side reports it
            return {"accepted": dict(seqpar=math.inf, sdpa=0.0, scale=0.0)}
        if out.shape != ql.shape or out.dtype != dt:
            return {"shape": dict(seqpar=math.inf, sdpa=0.0, scale=0.0)}
        out.backward(sh(do).to(dt))
        gqa = Hq != Hkv
        cu = s.get("cu")
        vis = visibility(S, s["causal"], s.get("window", (-1, -1)), None if cu is None else cu["values"])
        softcap = float(s.get("softcap", 0.0))
        ref = _math_grads(q, k, v, do, causal=s["causal"], scale=s["scale"], vis=vis, softcap=softcap)  # fp64
        low = _sdpa_grads(*(t.to(dt) for t in (q, k, v, do)), vis=vis, scale=s["scale"], gqa=gqa, softcap=softcap)
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
        if size > 1:  # 3-D (dp=1, cp_ring, cp_ulysses=2), "cp" flattened: method="hybrid"'s mesh
            _MESHES["hybrid"] = seqpar.init_mesh(cp=size, ulysses=2)
    return _MESHES


def mesh_cp(kind: str, P: int):
    """The cp size of a good mesh kind, None for a bad one."""
    return {"cp": P, "dp_cp": P, "dp2_cp2": 2, "hybrid": P}.get(kind)


def _resolve_mesh(kind: str, size: int):
    meshes = _meshes(size)
    if kind in meshes:
        return meshes[kind]
    return {"group": dist.group.WORLD, "none": None, "str": "cp", "int": size}[kind]


def _cp_rank(mesh) -> int:
    return mesh.get_local_rank() if mesh.ndim == 1 else mesh["cp"].get_local_rank()


INT_DTYPES = ("int64", "int32", "int16", "uint8", "int8")
FLAT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def batch_mask(s: dict) -> torch.Tensor | None:
    """The drawn attention_mask (1 = token, 0 = padding): all ones, or zeros ``mask_zeros`` = "right" /
    "left" (padding at one end of row 0, not the whole row), "holes" (random zeros), "row" (row 0 all
    padding), "all"."""
    if s["attention_mask"] == "none":
        return None
    m = torch.ones(_batch_tensor(s["attention_mask"], s["B"], s["S"], 0).shape, dtype=torch.long)
    z = s["mask_zeros"]
    if not z or not m.numel() or s["attention_mask"] != "BS":
        return m
    S = m.shape[1]
    n = 1 + s["seed"] % (S - 1) if S > 1 else 0  # padded tokens at one end of row 0 (not all of it)
    if z == "right":
        m[0, S - n:] = 0
    elif z == "left":
        m[0, :n] = 0
    elif z == "holes":
        m[torch.rand(m.shape, generator=torch.Generator().manual_seed(s["seed"] + 7)) < 0.4] = 0
    elif z == "row":
        m[0] = 0
    else:
        m[:] = 0
    return m


def flat_offsets(s: dict) -> list | None:
    """The drawn cu_seq_lens_q of a flattened batch (DataCollatorWithFlattening), before any fault."""
    if s.get("flat") is None:
        return None
    S = s["S"]
    g = torch.Generator().manual_seed(s["seed"] + 11)
    cuts = sorted(set(torch.randint(1, S, (3,), generator=g).tolist())) if S > 1 else []
    return [0, *cuts, S]


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
    # any S is valid: a length that does not divide is padded (an extra document of ignored tokens)
    for key, ok_kinds in (("labels", ("none", "BS")), ("position_ids", ("none", "BS", "1S", "S")),
                          ("attention_mask", ("none", "BS"))):
        if s[key] not in ok_kinds:
            names.append(key)
    if s["attention_mask"] == "BS" and S:  # zeros are padding; all zeros: nothing to train on
        m = batch_mask(s)
        if m.numel() and not bool(m.any()):
            names.append("attention_mask")
    flat = s.get("flat")
    if flat is not None:  # DataCollatorWithFlattening keys: equal 1-D offsets [0, ..., S] of one row (B=1)
        names += {"ok": [], "differ": ["cu_seq_lens_q", "cu_seq_lens_k"],
                  "only_q": ["cu_seq_lens_q", "cu_seq_lens_k"], "only_max": ["max_length_q", "max_length_k"],
                  "2d": ["cu_seq_lens_q", "cu_seq_lens_k"], "float": ["cu_seq_lens_q", "cu_seq_lens_k"],
                  "bad_end": ["cu_seq_lens_q"], "not_increasing": ["cu_seq_lens_q"],
                  "max_wrong": ["max_length_q", "max_length_k"]}[flat]
        if B != 1 and flat != "only_max":
            names += ["cu_seq_lens_q", "input_ids"]
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


def _positions(kind: str, B: int, S: int, seed: int, restart: bool) -> torch.Tensor:
    """position_ids of ``kind``'s shape: increasing, or (``restart``) runs that restart at 0 or drop
    (packed documents) and jump ahead (no new document)."""
    t = _batch_tensor(kind, B, S, seed, high=1000)
    L = t.shape[-1]
    if not L:
        return t
    if not restart:
        return t.sort(dim=-1).values
    g = torch.Generator().manual_seed(seed)
    rows = t.reshape(-1, L)
    for r in range(rows.shape[0]):
        p, i = [], 0
        while i < L:
            n = int(torch.randint(1, L + 1, (1,), generator=g))
            start = int(torch.randint(0, 4, (1,), generator=g)) * (int(torch.randint(0, 2, (1,), generator=g)))
            p += [start + j for j in range(min(n, L - i))]
            i += n
        rows[r] = torch.tensor(p)
    return rows.reshape(t.shape)


def make_batch(s: dict) -> dict:
    """The drawn batch (the same on every rank)."""
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
        pos = _positions(kind, B, S, seed + 3, s.get("pos_restart", False))
        batch["position_ids"] = pos.float() if s["position_ids"] == "float" else pos
    mask = batch_mask(s)
    if mask is not None:
        batch["attention_mask"] = mask
    cu = flat_offsets(s)
    if cu is not None:
        flat = s["flat"]
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        if flat == "bad_end":
            cu = cu[:-1] + [S + 1]
        elif flat == "not_increasing":
            cu = [0, *cu[:-1], S] if len(cu) > 2 else [0, 0, S]
        q = torch.tensor(cu, dtype=torch.int32)
        k = q.clone()
        if flat == "differ":
            k = torch.tensor([0, S], dtype=torch.int32) if len(cu) > 2 else torch.tensor([0, 1, S] if S > 1 else [0, 2])
        elif flat == "2d":
            q, k = q[None], k[None]
        elif flat == "float":
            q, k = q.float(), k.float()
        if flat != "only_max":
            batch["cu_seq_lens_q"] = q
        if flat not in ("only_q", "only_max"):
            batch["cu_seq_lens_k"] = k
        if flat in ("only_max", "max_wrong") or (flat != "only_q" and s.get("flat_max", True)):
            batch["max_length_q"] = batch["max_length_k"] = longest + (flat == "max_wrong")
    if s["extra_key"]:
        batch["token_type_ids"] = torch.zeros(B, S, dtype=torch.long)
    if s["meta"]:
        batch = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def shard_batch_reference(batch: dict, cp: int, rank: int, layout: str, ign: int) -> dict:
    """What shard_batch must return, written from its contract (not from seqpar): targets = labels of the
    next token of the row (the last token's and a padded token's, and a token followed by padding's:
    ignored); documents start where position_ids restart (a position 0, or below its predecessor) or at
    the given cu_seq_lens_q; rows with padding (or B > 1 rows with documents) become one row of the real
    tokens, each row its own document(s); a length that does not divide is padded at the end with an
    extra document of id 0, continuing positions and ignored targets, and only then ``seqpar_tokens``
    (bool, False at the last ``pad`` positions of every row); then every tensor is this rank's shard by the
    layout's definition (ref_indices)."""
    ids = batch["input_ids"]
    B, S = ids.shape
    pos = batch.get("position_ids")
    pos = [list(range(S))] * B if pos is None else pos.expand(B, S).tolist()
    mask = batch.get("attention_mask")
    keep = [[True] * S for _ in range(B)] if mask is None else [[bool(x) for x in row] for row in mask.tolist()]
    lab = batch.get("labels")
    lab = None if lab is None else lab.tolist()
    target = None if lab is None else [
        [lab[b][i + 1] if i + 1 < S and keep[b][i] and keep[b][i + 1] else ign for i in range(S)] for b in range(B)]
    if batch.get("cu_seq_lens_q") is not None:
        starts = [[int(x) for x in batch["cu_seq_lens_q"].tolist()[1:-1]]] * B
    else:
        starts = [[i for i in range(1, S) if pos[b][i] == 0 or pos[b][i] < pos[b][i - 1]] for b in range(B)]
    ids_rows, id_dtype = ids.tolist(), ids.dtype
    cu = None
    if not all(all(row) for row in keep) or (B > 1 and any(starts)):
        cu, rows_i, rows_p, rows_t = [0], [], [], []
        for b in range(B):
            kept = [i for i in range(S) if keep[b][i]]
            doc = lambda i: sum(1 for st in starts[b] if st <= i)  # noqa: E731
            for n, i in enumerate(kept):
                if n and doc(i) != doc(kept[n - 1]):
                    cu.append(len(rows_i))
                rows_i.append(ids_rows[b][i])
                rows_p.append(pos[b][i])
                if target is not None:
                    rows_t.append(target[b][i])
            if kept:  # a row of padding only is no document
                cu.append(len(rows_i))
        ids_rows, pos, target = [rows_i], [rows_p], None if target is None else [rows_t]
        B, S = 1, len(rows_i)
    elif B and starts[0]:
        cu = [0, *starts[0], S]
    pad = (-S) % unit(layout, cp)
    if pad:
        cu = (cu or [0, S]) + [S + pad]
        ids_rows = [row + [0] * pad for row in ids_rows]
        pos = [row + [row[-1] + 1 + j for j in range(pad)] for row in pos]
        target = None if target is None else [row + [ign] * pad for row in target]
        S += pad
    idx = ref_indices(S, rank, cp, layout)
    def local(rows, dt):
        return torch.tensor([[row[i] for i in idx] for row in rows], dtype=dt).reshape(B, len(idx))

    pos_dtype = torch.long if batch.get("position_ids") is None else batch["position_ids"].dtype
    want = {"input_ids": local(ids_rows, id_dtype), "position_ids": local(pos, pos_dtype)}
    if target is not None:
        want["labels"] = want["shift_labels"] = local(target, batch["labels"].dtype)
        want["num_items_in_batch"] = torch.tensor(sum(t != ign for row in target for t in row))
    if pad:
        want["seqpar_tokens"] = local([[i < S - pad for i in range(S)]] * B, torch.bool)
    if cu is not None and len(cu) > 2:
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        want.update(cu_seq_lens_q=torch.tensor(cu, dtype=torch.int32),
                    cu_seq_lens_k=torch.tensor(cu, dtype=torch.int32), max_length_q=longest, max_length_k=longest)
    return want


def _same(got, want) -> float:
    if isinstance(want, torch.Tensor):
        return _exact(got, want) if isinstance(got, torch.Tensor) else math.inf
    return 0.0 if type(got) is type(want) and got == want else math.inf


def shard_batch(rank: int, size: int, *, spec: dict):
    """``seqpar.shard_batch`` of a drawn batch -> outcome; ok details 0.0 if every output equals the
    independent reference (keys, values, dtypes), else a dict naming the outputs that differ."""
    s = spec
    mesh = _resolve_mesh(s["mesh"], size)
    batch = make_batch(s)
    arg = batch if s["batch_kind"] == "dict" else list(batch.values())

    def call():
        got = seqpar.shard_batch(arg, mesh, layout=s["layout"], ignore_index=s["ignore_index"])
        want = shard_batch_reference(batch, mesh_cp(s["mesh"], size), _cp_rank(mesh), s["layout"], s["ignore_index"])
        if set(got) != set(want):
            return {"keys": sorted(got), "want": sorted(want)}
        bad = {k: (got[k].tolist() if isinstance(got[k], torch.Tensor) else got[k],
                   want[k].tolist() if isinstance(want[k], torch.Tensor) else want[k])
               for k in want if _same(got[k], want[k])}
        return bad or 0.0
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
    for name, choices in (("layout", LAYOUTS), ("method", METHOD_CHOICES)):
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
    if s["method"] == "hybrid" and s["mesh"] != "hybrid":  # hybrid needs the mesh of init_mesh(cp, ulysses=U)
        return ("group", "mesh")
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
        replica = mesh["dp"].get_local_rank() if mesh.ndim > 1 else 0
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
