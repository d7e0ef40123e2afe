"""Testing support shared by the test suite, the benchmarks and the launcher checks (like ``torch.testing``).

- :mod:`seqpar.testing.numerics`: the fp64 single-device reference and the project's error bound;
- :mod:`seqpar.testing.worlds`: a pool of spawned gloo ranks that runs many cases per start-up;
- :mod:`seqpar.testing.processes`: launchers run in their own process group (a timeout kills the ranks).

Imported by name (``from seqpar.testing import numerics``); nothing here is imported by the library.
"""
