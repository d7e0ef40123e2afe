"""The LM head and the cross-entropy in chunks of tokens (used by the loss pass, passes/loss.py).

A causal LM given labels turns its final hidden states ``h`` (B, S/P, H) into logits (B, S/P, V) and
upcasts them to fp32 for the loss: at long sequences and large vocabularies that one tensor (and its
gradient) is the largest of the step. Here ``lm_head`` only sees an empty slice of ``h``; the loss is
computed by :class:`ChunkedCrossEntropy` from ``h`` and the head's weight, ``chunk`` tokens at a time::

    forward   for each chunk c of tokens:  z_c = post(h_c W^T + b)  (c, V)      the model's dtype
                                           lse_c = logsumexp(fp32 z_c);  loss += sum(lse_c - z_c[target])
              keeps h, W, b, targets and lse (N floats): never more than one chunk of logits at a time
    backward  for each chunk: z_c recomputed;  dz_c = g * (softmax(z_c) - onehot(target))  (fp32)
                                           through post (scale / soft-cap) back to h_c W^T + b;
              dh_c = dz_c W  (model dtype);  dW += dz_c^T h_c,  db += sum dz_c  (fp32 accumulators)

``post`` is what the model does between ``lm_head`` and its loss: Cohere multiplies by ``logit_scale``,
Granite divides by ``logits_scaling`` (HyperCLOVAX multiplies by it), Gemma 2/3 soft-cap
(``c * tanh(z / c)``). Which one a Hugging Face model does is established numerically, never by reading its
source (:func:`plan`): at ``parallelize`` the model runs once on a tiny random batch with the input of its
``lm_head`` replaced by synthetic hidden states large enough that every transform shows (logits of
magnitude ~20); the logits it returns must equal one candidate ``post`` applied to ``h W^T + b``, and its
loss must equal the cross-entropy of those logits over the non-ignored shifted labels divided by
``num_items_in_batch`` (plus ``router_aux_loss_coef * aux_loss`` for MoE models). A model that fails is run
on its own full path (``loss="auto"``, said once in a log on rank 0) or refused by name
(``loss="chunked"``); every rank takes the same decision (one all-reduce).

Plain PyTorch models (``loss="auto"`` and ``"chunked"``) cannot be probed: seqpar cannot run their forward on a
probe batch, so the check happens on every forward instead, exactly. In a forward given ``labels``/``targets``
their root ``lm_head`` (an ``nn.Linear``; otherwise "auto" keeps the model's own path) returns
:class:`~seqpar.passes.lazy_logits.LazyLogits`: the logits' shape and dtype without values. The
``F.cross_entropy`` override (passes/loss.py) given them, through reshapes and upcasts only, computes the chunked
loss (mean over the global count, or ``reduction="sum"``; ``ignore_index``, ``label_smoothing``; in fp32, or
fp64 for fp64 logits, returned in the logits' dtype). Anything else the model does with them during the forward
(a soft-cap, an accuracy, class weights, ``reduction="none"``): "auto" computes the real logits whole (said once
in a log on rank 0) and runs the model's own code on them; "chunked" raises ``ValueError``. After the forward
they are sealed: any use but metadata raises ``ValueError`` naming ``loss="full"``.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seqpar.passes.lazy_logits import LazyForward, LazyLogits

__all__ = ["LossMode", "LOSS_MODES", "Post", "ChunkedCrossEntropy", "chunked_cross_entropy", "default_chunk",
           "LMLoss", "check_loss", "plan"]

LossMode = Literal["auto", "chunked", "full"]
LOSS_MODES: tuple[str, ...] = ("auto", "chunked", "full")

_log = logging.getLogger(__name__)

# one chunk of fp32 logits: the forward and the backward each hold ~3 buffers of this size at a time
_CPU_BUDGET = 64 << 20
_CUDA_BUDGET = (64 << 20, 1 << 30)  # clamp of free memory / 16

Post = tuple[tuple[str, float], ...]  # ("mul", s) | ("div", s) | ("softcap", c), applied in order


def default_chunk(vocab: int, device: torch.device) -> int:
    """Tokens per chunk: one chunk of fp32 logits within the budget (CPU: 64 MiB; CUDA: free memory / 16,
    clamped to [64 MiB, 1 GiB]); a multiple of 16 when more than 16."""
    budget = _CPU_BUDGET
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 16, _CUDA_BUDGET[0]), _CUDA_BUDGET[1])
    tokens = max(1, budget // (4 * max(1, vocab)))
    return tokens - tokens % 16 if tokens > 16 else tokens


def _post_forward(z: torch.Tensor, post: Post) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``post`` applied to the head's output ``z`` (the model's dtype, the model's operations in its order);
    also what the backward needs per step (the tanh of a soft-cap)."""
    kept: list[torch.Tensor | None] = []
    for op, v in post:
        if op == "mul":
            z, t = z * v, None
        elif op == "div":
            z, t = z / v, None
        else:  # softcap: z / c, tanh, * c (Gemma 2/3's three operations)
            t = torch.tanh(z / v)
            z = t * v
        kept.append(t)
    return z, kept


def _post_backward(dz: torch.Tensor, post: Post, kept: list[torch.Tensor | None]) -> torch.Tensor:
    """d(loss)/d(head output) from d(loss)/d(post output), in place on fp32 ``dz``."""
    for (op, v), t in zip(reversed(post), reversed(kept)):
        if op == "mul":
            dz.mul_(v)
        elif op == "div":
            dz.div_(v)
        else:
            tf = t.float()
            dz.mul_(1 - tf * tf)
    return dz


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum over tokens with ``target != ignore_index`` of the cross-entropy of ``post(hidden W^T + b)``.

    ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``targets`` (N,) -> 0-d sum in ``dtype`` (the
    dtype the logits are upcast to for the loss: float32, or float64). Label smoothing ``eps`` as
    ``F.cross_entropy``: ``(1 - eps) * nll + eps * (lse - mean_j z_j)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, post, ignore_index, eps, chunk, dtype=torch.float32):
        N, V = hidden.shape[0], weight.shape[0]
        lse = torch.empty(N, dtype=dtype, device=hidden.device)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for s in range(0, N, chunk):
            z, _ = _post_forward(F.linear(hidden[s:s + chunk], weight, bias), post)
            z = z.to(dtype)  # (c, V)
            t = targets[s:s + chunk]
            valid = t != ignore_index
            lse_c = torch.logsumexp(z, dim=-1)
            lse[s:s + chunk] = lse_c
            term = lse_c - z.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
            if eps:
                term = (1 - eps) * term + eps * (lse_c - z.mean(dim=-1))
            total += torch.where(valid, term, 0).sum()
            del z
        ctx.save_for_backward(hidden, weight, targets, lse, *(() if bias is None else (bias,)))
        dev = hidden.device.type  # the backward recomputes the logits under the forward's autocast (same values)
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.post, ctx.ignore_index, ctx.eps, ctx.chunk, ctx.dtype = post, ignore_index, eps, chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse, *rest = ctx.saved_tensors
        bias = rest[0] if rest else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = hidden.shape[0], weight.shape[0]
        eps, acc = ctx.eps, ctx.dtype
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        g = grad.to(acc)
        for s in range(0, N, ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1]):
                z = F.linear(h, weight, bias)
            z, kept = _post_forward(z, ctx.post)
            dz = z.to(acc)
            if dz.data_ptr() == z.data_ptr():
                dz = dz.clone()
            del z
            t = targets[s:s + ctx.chunk]
            valid = t != ctx.ignore_index
            dz.sub_(lse[s:s + ctx.chunk, None]).exp_()  # softmax
            if eps:
                dz.sub_(eps / V)
            dz.scatter_add_(1, torch.where(valid, t, 0)[:, None],
                            torch.full((t.shape[0], 1), -(1 - eps), dtype=dz.dtype, device=dz.device))
            dz.mul_(torch.where(valid, g, 0)[:, None])
            dz = _post_backward(dz, ctx.post, kept)  # (c, V) in acc (fp32), d loss / d (h W^T + b)
            del kept
            if need_h:
                dh[s:s + ctx.chunk] = dz.to(weight.dtype) @ weight
            if need_w:
                dw.addmm_(dz.t(), h.to(acc))
            if need_b:
                db += dz.sum(dim=0)
            del dz
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, *, post: Post = (), ignore_index: int = -100,
                          label_smoothing: float = 0.0, chunk: int | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The summed cross-entropy (0-d, in ``dtype``: float32 or float64) of ``post(hidden @ weight.T + bias)``
    against ``targets``, never more than ``chunk`` tokens of logits at a time. ``hidden`` (..., H) and
    ``targets`` (...) are flattened."""
    H, V = weight.shape[1], weight.shape[0]
    hidden = hidden.reshape(-1, H)
    targets = targets.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"chunked loss: {targets.shape[0]} targets for {hidden.shape[0]} tokens of hidden states")
    if targets.is_floating_point():
        raise TypeError(f"chunked loss: targets must be class indices (an integer tensor), got {targets.dtype}")
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= V)
    if bool(bad.any()):
        raise IndexError(f"chunked loss: target {int(targets[bad][0])} is out of bounds for a vocabulary of {V} "
                         f"(ignore_index={ignore_index})")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"chunked loss: dtype must be torch.float32 or torch.float64, got {dtype}")
    if chunk is None:
        chunk = default_chunk(V, hidden.device)
    return ChunkedCrossEntropy.apply(hidden, weight, bias, targets, tuple(post), int(ignore_index),
                                     float(label_smoothing), int(chunk), dtype)


# ----------------------------------------------------------------------------- one model's chunked loss


@dataclass
class _Call:
    """One forward: what the root pre-hook took out of the kwargs, and the loss the head hook computed."""

    popped: dict[str, Any]
    targets: torch.Tensor | None
    num_items: Any
    ignore_index: int
    loss: torch.Tensor | None = None  # HF: the loss sum the head's pre-hook computed
    lazy: LazyForward | None = None  # plain: this forward's lazy logits (sealed by the root post-hook)
    hidden: torch.Tensor | None = None  # plain: the hidden states of the head call under way
    head_calls: int = 0


@dataclass
class LMLoss:
    """How one parallelized model's LM head and loss run in chunks.

    ``kind`` "hf": :meth:`start` (root pre-hook) takes ``labels``/``shift_labels``/``num_items_in_batch`` out of
    the forward's arguments, the head's pre-hook computes the loss from its input and hands ``lm_head`` an empty
    slice, :meth:`finish` (root post-hook) puts the loss (and the MoE auxiliary term) in ``output.loss``, sets
    ``output.logits`` to None and gives the arguments back. ``kind`` "sdpa" (plain models): :meth:`start_plain`,
    then ``lm_head`` returns :class:`~seqpar.passes.lazy_logits.LazyLogits`, :meth:`cross_entropy` (from the
    ``F.cross_entropy`` override) computes the chunked loss from them, :meth:`finish` seals them. ``mode``: the
    ``loss`` option ("auto": logits needed by anything else are computed whole, said once in a log; "chunked":
    refused by name)."""

    model_name: str
    head: nn.Linear
    post: Post
    chunk: int | None
    kind: str
    aux_coef: float | None = None
    forward_sig: inspect.Signature | None = None
    returns_dict: bool = True  # the config's return_dict (the default of the forward's return_dict)
    mode: str = "chunked"
    group: Any = None  # the log's rank 0
    _call: _Call | None = field(default=None, repr=False)
    _said: bool = field(default=False, repr=False)

    def __post_init__(self):
        self.head.register_forward_pre_hook(self._head_pre)
        self.head.register_forward_hook(self._head_post)

    # -- Hugging Face models

    def start(self, kwargs: dict[str, Any]) -> None:
        """Root pre-hook of an HF model: chunk this forward if it has labels (and returns a ModelOutput)."""
        self._call = None
        if kwargs.get("labels") is None or kwargs.get("return_dict", self.returns_dict) is False:
            return  # a tuple output: the model's own path (the loss is found by position there)
        keep = kwargs.get("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):  # the model's loss would read a slice: its own path
            return
        popped = {k: kwargs.pop(k) for k in ("labels", "shift_labels", "num_items_in_batch") if k in kwargs}
        self._call = _Call(popped, popped.get("shift_labels"), popped.get("num_items_in_batch"),
                           int(kwargs.get("ignore_index", -100)))

    def _head_pre(self, module, args):
        call = self._call
        if call is None:
            return None
        (hidden,) = args
        if self.kind == "hf":
            call.head_calls += 1
            if call.head_calls > 1:
                raise RuntimeError(f"seqpar chunked loss: {self.model_name} called its lm_head twice in one forward; "
                                   f"parallelize it with loss='full'")
            call.loss = chunked_cross_entropy(hidden, module.weight, module.bias, call.targets, post=self.post,
                                              ignore_index=call.ignore_index, chunk=self.chunk)
        else:
            call.hidden = hidden
        return (hidden.narrow(-2, 0, 0),)  # the head runs on no tokens: (..., 0, V), its dtype (autocast) only

    def _head_post(self, module, args, output):
        call = self._call
        if call is None or self.kind != "sdpa":
            return None
        hidden, call.hidden = call.hidden, None
        return LazyLogits.of(call.lazy, hidden, module.weight, module.bias, output.dtype)

    def finish(self, output: Any, kwargs: dict[str, Any]) -> Any:
        """Root post-hook: the arguments back, and the chunked loss in ``output`` (HF) or this forward's lazy
        logits sealed (plain)."""
        call, self._call = self._call, None
        if call is None:
            return output
        kwargs.update(call.popped)
        if call.lazy is not None:
            call.lazy.seal()
        if output is None or self.kind == "sdpa":  # None: the forward raised
            return output
        if call.loss is None:
            raise RuntimeError(f"seqpar chunked loss: {self.model_name} did not call its lm_head in a forward with "
                               f"labels; parallelize it with loss='full'")
        n = call.num_items
        loss = call.loss / (n.to(call.loss.device) if torch.is_tensor(n) else n)
        aux = output.get("aux_loss")
        if isinstance(aux, torch.Tensor) and self.aux_coef is not None:
            loss = loss + self.aux_coef * aux.to(loss.device)
        output["loss"] = loss
        output["logits"] = None
        return output

    # -- plain models

    def start_plain(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Root pre-hook of a plain model: lazy logits when the forward is given ``labels`` or ``targets``."""
        self._call = None
        try:
            bound = self.forward_sig.bind(*args, **kwargs).arguments
        except TypeError:
            return  # the forward itself will say what is wrong
        if any(bound.get(k) is not None for k in ("labels", "targets")):
            self._call = _Call({}, None, None, -100, lazy=LazyForward(self._used))

    def _used(self, what: str) -> None:
        """The model uses its logits during the forward for ``what`` (not the chunked loss): "auto" computes them
        whole (said once); "chunked" refuses."""
        if self.mode == "chunked":
            raise ValueError(f"seqpar chunked loss (loss='chunked'): {self.model_name} transforms or uses its lm_head "
                             f"logits ({what}) before / besides F.cross_entropy, which the chunked loss does not "
                             f"reproduce for plain models; parallelize it with loss='full' (or 'auto')")
        if not self._said:
            self._said = True
            g = self.group
            if not dist.is_initialized() or g is None or dist.get_rank(g) == 0:
                _log.warning("seqpar: %s uses its lm_head logits besides the loss (%s), so they are computed whole "
                             "(loss='auto'; the chunked loss needs them to go straight into F.cross_entropy, through "
                             "reshapes and upcasts only)", self.model_name, what)

    def cross_entropy(self, input: LazyLogits, target: torch.Tensor, weight, size_average, ignore_index: int, reduce,
                      reduction: str, label_smoothing: float) -> torch.Tensor | None:
        """The ``F.cross_entropy`` override given lazy logits: the chunked local sum (computed in float32, or
        float64 for float64 logits; the caller returns the loss in the logits' dtype), or None where the chunked
        loss does not reproduce the call ("auto": the caller computes the real logits,
        :meth:`LazyLogits.materialize`; "chunked": ``ValueError``)."""
        rows = input.rows()
        why = None
        if weight is not None or size_average is not None or reduce is not None:
            why = "class weights or the legacy size_average / reduce"
        elif reduction not in ("mean", "sum"):
            why = f"reduction={reduction!r}"
        elif not isinstance(target, torch.Tensor) or target.is_floating_point():
            why = "probability targets"
        elif rows is None or target.shape != input.shape[:1]:
            why = f"logits of shape {tuple(input.shape)} (not tokens x vocab rows) with targets of shape " \
                  f"{tuple(getattr(target, 'shape', ()))}"
        if why is not None:
            if self.mode == "chunked":
                raise ValueError(f"seqpar chunked loss (loss='chunked'): {self.model_name} calls F.cross_entropy with "
                                 f"{why}, which the chunked loss does not reproduce; parallelize it with loss='full' "
                                 f"(or 'auto')")
            self._used(f"F.cross_entropy with {why}")
            return None
        hidden, w, b = rows
        dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
        return chunked_cross_entropy(hidden, w, b, target, post=(), ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, chunk=self.chunk, dtype=dtype)


# ----------------------------------------------------------------------------- the decision at parallelize


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _candidates(model: nn.Module) -> list[Post]:
    """The ``post`` transforms the model's config makes plausible, simplest first; the probe picks."""
    cfg = _text_config(model)
    scales: list[Post] = [()]
    s = getattr(model, "logit_scale", None)
    if s is None:
        s = getattr(cfg, "logit_scale", None)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        scales.append((("mul", float(s)),))
    s = getattr(cfg, "logits_scaling", None)
    if isinstance(s, (int, float)) and not isinstance(s, bool) and s != 0:
        scales += [(("div", float(s)),), (("mul", float(s)),)]
    cap = getattr(cfg, "final_logit_softcapping", None)
    caps: list[Post] = [()]
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0:
        caps.append((("softcap", float(cap)),))
    return [a + b for a in scales for b in caps]


def _aux_coef(model: nn.Module) -> float | None:
    for obj in (model, _text_config(model)):
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            v = getattr(obj, name, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    return None


def _probe_hf(model: nn.Module, head: nn.Linear) -> tuple[Post | None, float | None, str | None]:
    """(post, MoE aux coefficient, None) when the model's logits and loss are what the chunked loss computes;
    (None, None, why) otherwise. One forward of the model on 2 x 16 random tokens, no communication."""
    W = head.weight
    V, H = W.shape
    g = torch.Generator().manual_seed(0)
    B, T, ignore = 2, 16, -100
    dev = W.device
    ids = torch.randint(0, V, (B, T), generator=g).to(dev)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[1, 3] = ignore
    shift = torch.cat([labels[:, 1:], torch.full((B, 1), ignore)], dim=1)
    num_items = (shift != ignore).sum()
    labels, shift, num_items = labels.to(dev), shift.to(dev), num_items.to(dev)
    with torch.no_grad():
        rms = W.float().norm(dim=1).pow(2).mean().sqrt()
    if not torch.isfinite(rms) or rms <= 0:
        return None, None, "the weight of its lm_head is zero or not finite"
    scale = 20.0 / float(rms)  # logits of magnitude ~20: every scale / soft-cap shows
    seen: dict[str, torch.Tensor] = {}

    def pre(module, args):
        x = args[0]
        h = (torch.randn(x.shape, generator=g) * scale).to(device=x.device, dtype=x.dtype)
        seen.setdefault("h", h)
        seen["calls"] = seen.get("calls", 0) + 1
        return (h,)

    kwargs: dict[str, Any] = dict(input_ids=ids, labels=labels, shift_labels=shift, num_items_in_batch=num_items,
                                  position_ids=torch.arange(T, device=dev).expand(B, T), use_cache=False)
    coef = _aux_coef(model)
    if hasattr(_text_config(model), "output_router_logits"):
        kwargs["output_router_logits"] = True
    modes = {m: m.training for m in model.modules()}
    handle = head.register_forward_pre_hook(pre)
    try:
        model.eval()
        with torch.no_grad():
            out = model(**kwargs)
    except Exception as e:  # noqa: BLE001 - any failure: not proven
        return None, None, f"its forward on a probe batch raised {type(e).__name__}: {e}"
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if seen.get("calls") != 1:
        return None, None, f"its forward called lm_head {seen.get('calls', 0)} times (not once)"
    logits, loss = getattr(out, "logits", None), getattr(out, "loss", None)
    if not isinstance(logits, torch.Tensor) or not isinstance(loss, torch.Tensor):
        return None, None, "its forward did not return logits and a loss"
    h = seen["h"]
    with torch.no_grad():
        z = F.linear(h, W, head.bias)
        if logits.shape != z.shape:
            return None, None, f"its logits {tuple(logits.shape)} are not lm_head's output {tuple(z.shape)}"
        eps = torch.finfo(z.dtype).eps if z.dtype.is_floating_point else 0.0
        best, post = math.inf, None
        for cand in _candidates(model):
            err = float((_post_forward(z, cand)[0].float() - logits.float()).abs().max())
            if err < best:
                best, post = err, cand
        mag = float(logits.float().abs().max())
        if not best <= 8 * eps * max(mag, 1.0) + 1e-6:
            return None, None, ("its logits are not lm_head(h) followed by a transform seqpar reproduces (a logit scale "
                                "from logit_scale / logits_scaling, a soft-cap from final_logit_softcapping)")
        flat = logits.float().reshape(-1, V)
        want = F.cross_entropy(flat, shift.reshape(-1), ignore_index=ignore, reduction="sum") / num_items
        aux = getattr(out, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            if coef is None:
                return None, None, "it adds an MoE aux_loss whose coefficient (router_aux_loss_coef) is not found"
            want = want + coef * aux.to(want.device)
        if not torch.allclose(loss.float(), want.to(loss.device), rtol=1e-5, atol=1e-6):
            return None, None, (f"its loss ({float(loss):.6g}) is not the cross-entropy of its logits over the "
                                f"shift_labels divided by num_items_in_batch ({float(want):.6g})")
    return post, coef, None


def plan(model: nn.Module, kind: str, mode: str, chunk: int | None, group) -> LMLoss | None:
    """The chunked loss of ``model`` (None: the model's own full path), decided the same on every rank of
    ``group``. ``mode="chunked"``: ``ValueError`` naming the model class where seqpar cannot chunk."""
    name = type(model).__name__
    if mode == "full":
        return None
    if kind != "hf":  # plain: lazy logits, checked on every forward (lazy_logits.py), no probe
        head = getattr(model, "lm_head", None)
        if type(head) is not nn.Linear:
            if mode == "auto":
                return None  # the model's own path
            raise ValueError(f"seqpar.parallelize(loss='chunked'): {name} has no lm_head that is an nn.Linear (got "
                             f"{type(head).__name__}); pass loss='full'")
        return LMLoss(name, head, (), chunk, "sdpa", forward_sig=inspect.signature(model.forward), mode=mode,
                      group=group)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    post, coef, why = None, None, None
    if type(head) is not nn.Linear:
        why = f"its output embedding is {type(head).__name__}, not an nn.Linear"
    else:
        post, coef, why = _probe_hf(model, head)
    param = next(model.parameters(), None)
    ok = torch.tensor([0 if why else 1], device="cpu" if param is None else param.device)
    if dist.is_initialized() and group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # every rank decides the same
    if int(ok.item()) == 1:
        return LMLoss(name, head, post, chunk, "hf", aux_coef=coef,
                      returns_dict=getattr(model.config, "return_dict", True) is not False)
    why = why or "another rank's probe of it failed"
    if mode == "chunked":
        raise ValueError(f"seqpar.parallelize(loss='chunked'): {name}'s LM head and loss cannot be chunked: {why}; "
                         f"pass loss='full' (or 'auto')")
    if not dist.is_initialized() or group is None or dist.get_rank(group) == 0:
        _log.warning("seqpar: %s computes its full logits (loss='auto' falls back to the model's own LM head and "
                     "loss): %s", name, why)
    return None


def check_loss(loss: object, loss_chunk: object) -> None:
    """``parallelize``'s ``loss`` / ``loss_chunk`` (check pass, before any communication)."""
    if not isinstance(loss, str) or loss not in LOSS_MODES:
        raise ValueError(f"loss must be one of {LOSS_MODES} (the LM head + cross-entropy: 'auto' chunked where seqpar "
                         f"proves it equal to the model's own, 'chunked' always or refused, 'full' never), got "
                         f"{loss!r}")
    if loss_chunk is None:
        return
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int):
        raise TypeError(f"loss_chunk must be an int (tokens per chunk of the LM head + loss) or None (from memory), "
                        f"got {type(loss_chunk).__name__} {loss_chunk!r}")
    if loss_chunk < 1:
        raise ValueError(f"loss_chunk must be >= 1 (tokens per chunk of the LM head + loss), got {loss_chunk}")
