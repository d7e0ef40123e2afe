"""MoE router load-balancing loss over the *global* sequence (used by the loss pass, passes/loss.py).

Hugging Face MoE causal LMs (Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, gpt-oss, ...) given
``output_router_logits=True`` add ``router_aux_loss_coef * aux`` to the loss, with transformers'
``load_balancing_loss_func`` (Switch Transformer eq. 4-6, summed over the layers)::

    aux = E * sum_e  f_e * P_e        f_e = C_e / N    C_e: (token, top-k slot) pairs routed to expert e
                                      P_e = Q_e / N    Q_e: router probabilities of expert e, summed
                                                       N:   tokens (rows), every sum over tokens AND layers

Products of means over *all* tokens: the mean of per-shard losses is not the global one. Each cp
rank holds its tokens' router logits, so

    C_e, N      local sums, all-reduced (no gradient: top-k indices)
    aux_r = E * sum_e (C_e^global / N^global) * (Q_e^local / N^global)

``aux_r`` summed over the cp ranks (``reduce_forward``) is the global ``aux``, and since ``aux`` is
linear in the ``Q_e`` once the counts are fixed, ``d aux_r / d (rank r's router logits)`` is exactly
the single-device gradient for rank r's tokens. The loss pass puts ``coef * aux_r`` in place of the
model's local ``coef * aux`` in ``output.loss`` before reducing it, and ``output.aux_loss`` becomes the
global value on every rank.

Which function a model uses is established twice, numerically, never by reading its source:

- at ``parallelize`` (:func:`check_router_loss`): the model module's ``load_balancing_loss_func`` is
  called on synthetic router logits (with and without an all-ones mask) and must equal the form above;
  the number of experts, top-k and the coefficient are read where the model's forward reads them;
- on every forward (:meth:`RouterLoss.apply`): the form above recomputed on this rank's router logits
  must equal the ``aux_loss`` the model itself returned (any difference in function, top-k or
  experts shows up here); the verdict travels with the all-reduced counts, so every rank raises.

A model whose loss cannot be reproduced is refused by name (``ValueError``) at ``parallelize`` when
its config turns the router loss on, and at forward time when ``output_router_logits=True`` is passed;
``output_router_logits=False`` or ``router_aux_loss_coef=0`` are the way out. Models that return
router logits without an auxiliary loss (DeepSeek-V3, GLM-4-MoE, ...) need nothing: their loss does
not depend on them.

The tokens ``seqpar.shard_batch`` appends to a length that is not a multiple of the layout's unit run
through the model, so their rows are in the router logits (and in the model's local ``aux_loss``,
which the check above still compares with all rows). The batch's ``seqpar_tokens`` ((B, S_local)
bool, False = padding; the loss pass takes it out of the forward's arguments) selects the rows of
the global statistics: ``C_e``, ``Q_e`` and ``N`` sum over the real tokens only, as the single-device
model does on the unpadded sequence. The rows of each layer's logits are the (B, S_local) tokens
flattened batch-major (``hidden.view(-1, H)``); logits with another number of rows are refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["RouterLoss", "router_loss", "check_router_loss"]

_TOL = 1e-4  # relative: the same operations on the same data agree to float rounding


@dataclass(frozen=True)
class RouterLoss:
    """How one model's router load-balancing loss is made global; ``refusal`` says why it cannot be.

    ``has_loss``: the model's module defines ``load_balancing_loss_func`` (it adds a router loss); a model
    without one that nevertheless returns an ``aux_loss`` is refused at forward time."""

    model_name: str
    has_loss: bool
    num_experts: int | None
    top_k: int | None
    coef: float
    config: Any  # the (text) config whose output_router_logits is the default of the forward flag
    refusal: str | None = None

    def enabled(self, kwargs: dict[str, Any]) -> bool:
        """Whether this forward returns router logits (the kwarg, else the config's default)."""
        flag = kwargs.get("output_router_logits")
        return bool(getattr(self.config, "output_router_logits", False) if flag is None else flag)

    def error(self, why: str | None = None) -> ValueError:
        return ValueError(f"{self.model_name}: the MoE router load-balancing loss is not supported under sequence "
                          f"parallelism ({why or self.refusal}); pass output_router_logits=False (config or forward) "
                          f"or set router_aux_loss_coef=0")

    def check_call(self, kwargs: dict[str, Any]) -> None:
        """Before a forward (and at ``parallelize`` with ``{}``): refuse a router loss seqpar cannot make global."""
        if self.has_loss and self.refusal is not None and self.coef != 0 and self.enabled(kwargs):
            raise self.error()

    def apply(self, output: Any, kwargs: dict[str, Any], group, tokens: torch.Tensor | None = None) -> Any:
        """``output`` with ``aux_loss`` global and ``loss`` holding ``coef * aux_r`` instead of the local term
        (``loss`` is then reduced over cp by the loss pass). ``tokens``: the batch's ``seqpar_tokens`` (False:
        shard_batch's end padding, left out of the global statistics) or None (every token is real)."""
        from seqpar.passes.loss import reduce_forward  # (loss.py imports this module)

        if isinstance(output, tuple):
            if self.enabled(kwargs):
                raise ValueError(f"{self.model_name}: output_router_logits=True with return_dict=False; seqpar "
                                 f"finds the router logits and aux_loss by name: use return_dict=True")
            return output
        aux = output.get("aux_loss")
        if not isinstance(aux, torch.Tensor):
            return output
        if not self.has_loss or self.refusal is not None:
            if self.coef != 0 or not self.has_loss:
                raise self.error(self.refusal if self.has_loss else
                                 "it returns an aux_loss without a load_balancing_loss_func seqpar could verify")
            output["aux_loss"] = None  # coef 0: not in the loss; a local value would pass for the global one
            return output
        logits = output.get("router_logits")
        sums = _sums(logits, self.num_experts, self.top_k)
        misfit = torch.zeros((), device=aux.device)
        if sums is None:  # not the (tokens, E) per-layer logits load_balancing_loss_func takes
            counts, probs, rows = (torch.zeros(self.num_experts, device=aux.device), None,
                                   torch.zeros((), device=aux.device))
            bad = torch.ones((), device=aux.device)
        else:
            counts, probs, rows = sums  # every row, as the model's own aux_loss
            mine = self.num_experts * torch.sum((counts / rows) * (probs.detach() / rows))
            ref = aux.detach().float()
            bad = ((mine - ref).abs() > _TOL * ref.abs() + 1e-12).float()  # the model's function is ours?
            if tokens is not None:  # the global statistics: the real tokens only
                real = _sums(logits, self.num_experts, self.top_k, tokens)
                if real is None:
                    misfit = torch.ones((), device=aux.device)
                else:
                    counts, probs, rows = real
        stats = torch.cat([counts, torch.stack([rows, bad, misfit])])  # (E + 3,) fp32
        # [C_e global..., N global, ranks whose aux_loss differs, ranks whose logits do not match the tokens]
        dist.all_reduce(stats, group=group)
        if stats[-2].item() > 0:
            raise self.error(f"the model's aux_loss differs from load_balancing_loss_func with {self.num_experts} "
                             f"experts and top-{self.top_k}, the Switch-Transformer form seqpar makes global, on "
                             f"{int(stats[-2].item())} rank(s)")
        if stats[-1].item() > 0:
            raise self.error(f"its router logits do not have one row per token of the batch (B * S_local, "
                             f"batch-major) on {int(stats[-1].item())} rank(s), so the padding shard_batch adds to "
                             f"a length that is not a multiple of the layout's unit (cp, 2 cp for zigzag) cannot be "
                             f"left out of them; pass a sequence length that is a multiple of it")
        c_global, n_global = stats[:-3], stats[-3]
        aux_r = (self.num_experts * torch.sum((c_global / n_global) * (probs / n_global))).to(aux.dtype)
        loss = output.get("loss")
        if loss is not None and kwargs.get("labels") is not None and self.coef != 0:
            # the model's loss is lm + coef * aux_local: swap the local term for this rank's share
            output["loss"] = loss - self.coef * aux.to(loss.device) + self.coef * aux_r.to(loss.device)
        output["aux_loss"] = reduce_forward(aux_r, group)
        return output


def _sums(gates: Any, num_experts: int, top_k: int, tokens: torch.Tensor | None = None):
    """Per-expert sums over this rank's tokens and every layer: (routed (token, slot) counts (E,) fp32 no grad,
    router probability sums (E,) fp32 with grad, rows () fp32) -- or None if the logits are not a tuple of
    (tokens, E) tensors (the form load_balancing_loss_func takes), or, given ``tokens`` ((B, S_local) bool,
    True = a real token), do not have one row per token (B * S_local): then only the rows of real tokens count."""
    if not isinstance(gates, (tuple, list)) or not gates:
        return None
    if any(not isinstance(g, torch.Tensor) or g.ndim != 2 or g.shape[-1] != num_experts for g in gates):
        return None
    device = gates[0].device
    keep = None if tokens is None else tokens.reshape(-1).to(device=device, dtype=torch.bool)  # batch-major
    if keep is not None and any(g.shape[0] != keep.numel() for g in gates):
        return None
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0
    for g in gates:  # (T_local, E)
        if keep is not None:
            g = g[keep.to(g.device)]  # the real tokens' rows
        weights = torch.softmax(g.to(device), dim=-1)
        chosen = torch.topk(weights.detach(), top_k, dim=-1).indices  # (T_local, k)
        counts += torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        probs = probs + weights.float().sum(dim=0)
        rows += g.shape[0]
    return counts, probs, torch.tensor(float(rows), device=device)


def _form(gates: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    counts, probs, rows = _sums(gates, num_experts, top_k)
    return num_experts * torch.sum((counts / rows) * (probs / rows))


def _attr(model: nn.Module, names: tuple[str, ...]) -> Any:
    """The first of ``names`` on the model (what its forward reads), else on its text config."""
    for obj in (model, _text_config(model)):
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                return value
    return None


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _probe(fn, num_experts: int, top_k: int) -> str | None:
    """Why ``fn`` (a model module's load_balancing_loss_func) is not the form seqpar makes global, or None."""
    g = torch.Generator().manual_seed(0)
    gates = tuple(torch.randn(12, num_experts, generator=g) * 2 for _ in range(3))  # 3 layers x 12 tokens
    want = _form(gates, num_experts, top_k)
    for mask in (None, torch.ones(2, 6, dtype=torch.long)):
        try:
            got = fn(gates, num_experts, top_k, mask)
        except Exception as e:  # noqa: BLE001 - another signature: not the form
            return f"its load_balancing_loss_func({num_experts} experts, top-{top_k}) raised {type(e).__name__}"
        if not isinstance(got, torch.Tensor) or got.shape != () or \
                not torch.allclose(got.double(), want.double(), rtol=1e-5, atol=0):
            return "its load_balancing_loss_func is not the Switch-Transformer form seqpar implements"
    return None


def router_loss(model: nn.Module) -> RouterLoss | None:
    """How ``model``'s router loss is made global; None when its config has no ``output_router_logits``
    (not a MoE model of transformers)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(_text_config(model), "output_router_logits"):
        return None
    name, text = type(model).__name__, _text_config(model)
    coef = _attr(model, ("router_aux_loss_coef", "aux_loss_coef"))
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    if fn is None:  # router logits without a loss (DeepSeek-V3, GLM-4-MoE, ...); an aux_loss is refused at forward
        return RouterLoss(name, False, None, None, 0.0 if coef is None else float(coef), text)
    experts = _attr(model, ("num_experts", "num_local_experts", "n_routed_experts"))
    top_k = _attr(model, ("num_experts_per_tok", "top_k", "moe_top_k"))
    if isinstance(experts, bool) or not isinstance(experts, int) or isinstance(top_k, bool) or \
            not isinstance(top_k, int) or not 0 < top_k <= experts:
        refusal = f"the number of experts ({experts!r}) and top-k ({top_k!r}) of its loss are not found"
    elif coef is None:
        refusal = "the coefficient of its router loss (router_aux_loss_coef) is not found"
    else:
        refusal = _probe(fn, experts, top_k)
    return RouterLoss(name, True, experts, top_k, 1.0 if coef is None else float(coef), text, refusal)


def check_router_loss(model: nn.Module) -> RouterLoss | None:
    """``parallelize``-time check (no communication): ``ValueError`` naming the model class when its config turns
    on a router load-balancing loss seqpar cannot make global. -> :func:`router_loss`."""
    spec = router_loss(model)
    if spec is not None:
        spec.check_call({})
    return spec
