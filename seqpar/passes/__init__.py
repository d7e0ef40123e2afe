"""The passes of ``seqpar.parallelize``, one module each, applied in order by :mod:`seqpar.parallel`.

    check          options, mesh and model kind                       passes/check.py
    sync           parameters and buffers equal on every rank         passes/sync.py
    attention      the model's attention -> seqpar attention          passes/attention.py (+ hf.py)
    loss           global-token loss over cp                          passes/loss.py
    checkpoint     per-block activation checkpointing, ring replayed  passes/checkpoint.py
    data_parallel  FSDP2 or all-reduced gradients over dp x cp        passes/data_parallel.py

They share one :class:`~seqpar.passes.runtime.Runtime` per ``parallelize`` call (its options, the
torch-function overrides of plain models, the checkpoint frames), reached by closures and hooks:
nothing is global.
"""
