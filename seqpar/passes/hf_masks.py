"""What a transformers ``mask_function`` means, in seqpar's terms: causal, a window band, fixed chunks.

transformers builds every attention mask from a *mask function* ``f(batch, head, q_idx, kv_idx) -> bool``
composed of a few factories of ``transformers.masking_utils`` (``and_masks``, ``or_masks``,
``causal_mask_function``, ``sliding_window_overlay``, ``chunked_overlay``, ...), and hands it to the
registered mask hook (``AttentionMaskInterface``). seqpar's hook does not build a mask (the ring masks
by *global* position); it reads the function instead:

- each node is recognised by its **code object** (``fn.__code__ is <the factory's inner code>``), not by
  its name, and its parameters are read from the closure (``sliding_window``, ``chunk_size``, ...);
- the recognised atoms are checked against their definition on a small grid of index pairs before
  they are trusted (a transformers release that changed an atom's meaning is refused, not followed);
- the intersection (``and_masks``) of the atoms becomes one :class:`MaskPlan`: causal or not, a band
  ``window_size = (left, right)`` (flash-attention's convention), and a chunk size (Llama 4's chunked
  attention: block-diagonal chunks of ``C`` tokens, intersected with causal and with the documents);
- the parts seqpar replaces by global information are accepted and dropped: the packed-sequence
  mask and the position remap (computed by transformers from the *local* ``position_ids``, whose
  jumps under zigzag are not documents; seqpar's documents are ``cu_seqlens``), an all-ones padding
  mask, zero left padding;
- anything else (``or_masks`` overlays such as bidirectional image blocks, a custom function, left
  padding, a padding mask with zeros) is refused by name: a ``ValueError`` naming the model's config
  class, the mask and the function, so no mask ever reaches the attention as "none" unless the model
  asked for none.

Note
----
The three shapes a plan can take, at query ``i`` and key ``j`` (``x``: attended)::

    causal            window (left w-1)        chunked (C = 3)
    x . . . . .       x . . . . .              x . . . . .
    x x . . . .       x x . . . .              x x . . . .
    x x x . . .       . x x . . .   (w = 2)    x x x . . .
    x x x x . .       . . x x . .              . . . x . .
    x x x x x .       . . . x x .              . . . x x .
    x x x x x x       . . . . x x              . . . x x x

A chunk is a document of ``C`` tokens anchored at the start of each of the batch's documents (rows),
so chunked attention runs on the tile planner's document path and skips every tile outside the
chunks (about ``S * C`` work, not ``S^2 / 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["MaskPlan", "read_mask_function", "chunk_offsets"]


@dataclass(frozen=True)
class MaskPlan:
    """A transformers mask in seqpar's terms (what the hook hands to the attention as ``attention_mask``).

    ``causal``: keys after the query are masked. ``window_size``: ``(left, right)`` band, -1 = unbounded.
    ``chunk``: chunk size ``C`` of chunked attention (None: none). ``what``: where it came from (messages).
    """

    causal: bool
    window_size: tuple[int, int] = (-1, -1)
    chunk: int | None = None
    what: str = ""

    # A model that treats its attention mask as a tensor (slices it, reads its dtype, adds to it) would do so to
    # a mask seqpar never built: refused here, by name, rather than failing somewhere inside the model.
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotImplementedError(f"seqpar: the model reads attention_mask.{name}, treating its mask as a tensor; "
                                  f"under parallelize the mask is applied by global position inside the ring and "
                                  f"no mask tensor exists, so this model is not supported")

    def __getitem__(self, index):
        raise NotImplementedError("seqpar: the model slices its attention mask; under parallelize the mask is applied "
                                  "by global position inside the ring and no mask tensor exists, so this model is "
                                  "not supported")

    def _as_tensor(self, *args):
        raise NotImplementedError("seqpar: the model computes with its attention mask as a tensor; under parallelize "
                                  "no mask tensor exists, so this model is not supported")

    __add__ = __radd__ = __mul__ = __rmul__ = __sub__ = __rsub__ = __and__ = __or__ = __invert__ = _as_tensor


class _Refused(ValueError):
    pass


def _inner_codes() -> dict[str, Any]:
    """The code object of each transformers mask factory's (inner) function, by the atom it makes."""
    from transformers import masking_utils as mu

    pad = torch.zeros(1, dtype=torch.long)
    codes = {
        "and": mu.and_masks(mu.causal_mask_function).__code__,
        "or": mu.or_masks(mu.causal_mask_function).__code__,
        "causal": mu.causal_mask_function.__code__,
        "bidirectional": mu.bidirectional_mask_function.__code__,
        "sliding": mu.sliding_window_overlay(1).__code__,
        "sliding_bidirectional": mu.sliding_window_bidirectional_overlay(1).__code__,
        "chunked": mu.chunked_overlay(1, pad).__code__,
        "padding": mu.padding_mask_function(pad[None].bool()).__code__,
        "packed": mu.packed_sequence_mask_function(pad[None]).__code__,
        "remap": mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pad[None]).__code__,
        "offsets": mu.add_offsets_to_mask_function(mu.causal_mask_function, 0, 0).__code__,
    }
    if hasattr(mu, "blockwise_overlay"):
        codes["blockwise"] = mu.blockwise_overlay(pad[None]).__code__
    return codes


def _closure(fn: Callable) -> dict[str, Any]:
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


# Each recognised atom, checked on a grid of (q, kv) index pairs against its definition before it is trusted.
_GRID = torch.arange(24)


def _verify(fn: Callable, expect: torch.Tensor, what: str) -> None:
    q, kv = _GRID[:, None], _GRID[None, :]
    try:
        got = torch.as_tensor(fn(torch.tensor(0), torch.tensor(0), q, kv)).expand(len(_GRID), len(_GRID))
    except Exception as e:  # noqa: BLE001 - any failure means: not the atom we think it is
        raise _Refused(f"{what} could not be evaluated on index pairs ({type(e).__name__}: {e})") from e
    if not torch.equal(got.bool(), expect):
        raise _Refused(f"{what} does not compute what seqpar reads it as (this transformers version changed it)")


def _atoms(fn: Callable, codes: dict[str, Any], depth: int = 0) -> list[tuple[str, Any]]:
    """The intersection of atoms ``fn`` is, as (kind, parameter) pairs; raises _Refused for anything else."""
    if depth > 16:
        raise _Refused("a mask function nested too deeply")
    code = getattr(fn, "__code__", None)
    name = getattr(fn, "__qualname__", type(fn).__name__)
    kind = next((k for k, c in codes.items() if c is code), None)
    q, kv = _GRID[:, None], _GRID[None, :]
    cl = _closure(fn) if kind is not None else {}
    if kind == "and":
        return [a for f in cl["mask_functions"] for a in _atoms(f, codes, depth + 1)]
    if kind == "remap":  # packed sequence: the index pairs become local position_ids; documents come from cu_seqlens
        return _atoms(cl["mask_function"], codes, depth + 1)
    if kind == "offsets":
        if int(cl["q_offset"]) != int(cl["kv_offset"]):
            raise _Refused(f"query offset {cl['q_offset']} != key offset {cl['kv_offset']} (a KV cache)")
        return _atoms(cl["mask_function"], codes, depth + 1)
    if kind == "causal":
        _verify(fn, kv <= q, "causal_mask_function")
        return [("causal", None)]
    if kind == "bidirectional":
        _verify(fn, (kv >= 0) & (q >= 0), "bidirectional_mask_function")
        return []
    if kind == "sliding":
        w = int(cl["sliding_window"])
        _verify(fn, kv > q - w, f"sliding_window_overlay({w})")
        return [("window", (w - 1, -1))]  # kv > q - w: at most w - 1 keys to the left (with causal: w keys)
    if kind == "sliding_bidirectional":
        w = int(cl["sliding_window"])
        _verify(fn, (q - kv).abs() <= w, f"sliding_window_bidirectional_overlay({w})")
        return [("window", (w, w))]
    if kind == "chunked":
        c, left = int(cl["chunk_size"]), cl["left_padding"]
        if bool(torch.as_tensor(left).ne(0).any()):
            raise _Refused("chunked attention with left padding (build the batch with seqpar.shard_batch, which "
                           "drops padding)")
        _verify(fn, kv // c == q // c, f"chunked_overlay({c})")
        return [("chunk", c)]
    if kind == "padding":
        if not bool(torch.as_tensor(cl["padding_mask"]).all()):
            raise _Refused("a padding mask with zeros (build the batch with seqpar.shard_batch, which turns "
                           "padding into packed documents)")
        return []
    if kind == "packed":  # local document ids from local position_ids: seqpar's documents are cu_seqlens
        return []
    if kind in ("or", "blockwise"):
        raise _Refused(f"a mask overlay ({name}: e.g. bidirectional attention within image/token blocks) that "
                       f"seqpar does not implement")
    raise _Refused(f"an unrecognised mask function {name!r}")


def read_mask_function(mask_function: Callable, *, config: Any = None, mask: str = "") -> MaskPlan:
    """``mask_function`` (a transformers mask function) -> :class:`MaskPlan`; ``ValueError`` naming the model's
    config class, ``mask`` and the part seqpar cannot read when it is anything else."""
    owner = type(config).__name__ if config is not None else "the model"
    try:
        atoms = _atoms(mask_function, _inner_codes())
    except _Refused as e:
        raise ValueError(f"seqpar cannot run {owner}'s attention mask{f' ({mask})' if mask else ''}: {e}. Sequence "
                         f"parallelism must reproduce the mask exactly, so this model (or configuration) is refused; "
                         f"the way out is a configuration without it") from None
    causal, left, right, chunk = False, -1, -1, None

    def tighter(a: int, b: int) -> int:
        return b if a < 0 else a if b < 0 else min(a, b)

    for kind, p in atoms:
        if kind == "causal":
            causal = True
        elif kind == "window":
            left, right = tighter(left, p[0]), tighter(right, p[1])
        elif kind == "chunk":
            if chunk is not None and chunk != p:
                raise ValueError(f"seqpar cannot run {owner}'s attention mask: two chunk sizes ({chunk}, {p})")
            chunk = p
    if causal:
        right = -1  # causal already masks every key to the right
    return MaskPlan(causal=causal, window_size=(left, right), chunk=chunk, what=mask or "mask")


def chunk_offsets(chunk: int, total: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Document offsets (int32, [0, ..., total]) of chunked attention: every document of ``cu_seqlens`` (or
    the whole sequence of ``total`` tokens) cut into chunks of ``chunk`` tokens from its start."""
    docs = [0, total] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    cuts: list[int] = [0]
    for a, b in zip(docs, docs[1:]):
        cuts += list(range(a + chunk, b, chunk)) + [b]
    device = cu_seqlens.device if cu_seqlens is not None else None
    return torch.tensor(cuts, dtype=torch.int32, device=device)
