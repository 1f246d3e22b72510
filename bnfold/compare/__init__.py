"""Equivalence check: run the original and the folded model on the same seeded inputs and compare.

How a check runs
----------------
Both models run under ONNX Runtime on CPU with graph optimizations **disabled**: from the "basic"
level up ORT fuses Conv+BatchNormalization itself, which would make the reference look like the
folded model and hide a wrong fold. The reference session runs first (all ``samples`` batches), its
outputs are kept, and the session is deleted and garbage-collected before the candidate session is
created, so peak memory is one model plus one set of outputs, not two models.

Inputs come from the reference model's declared inputs, seeded with ``numpy.random.default_rng``:
floating inputs are standard normal (cast to the input's dtype), integer inputs uniform in
``[0, 4)`` (small enough to be valid indices for most Gather-like ops), bool inputs fair coin flips.
Symbolic dimensions not given in ``input_shapes`` are sized so that every weight is exercised
(:mod:`bnfold.exercise`: batch 1, every kernel tap sees data); the result records the shapes and
whether each was given, fixed or derived. Batch ``k`` of ``samples`` uses seed ``seed + k``, so any
failing batch can be reproduced alone. The whole check runs under a time budget
(``timeout``/``$BNFOLD_VERIFY_TIMEOUT``); a reference ORT cannot run, or a spent budget, makes the
result *unverified* (``status``), never a pass.

The default verdict: calibrated
-------------------------------
Unless the caller gives ``atol``/``rtol``/``output_tolerances``, each floating output is judged
against the reference's own measured noise (:mod:`bnfold.calibrate`): the check is the element-wise
rule below with ``atol = FACTOR x max(ort_basic, weight_ulp) + FLOOR_ULPS x u x max|ref|`` and
``rtol = 0`` (``OutputComparison.mode == "calibrated"``), so every statistic below keeps its meaning.
The noise floor (``noise``, ``noise_sources``) and the ``margin`` are reported for every output.

What "equal" means
------------------
Element-wise, with the semantics of ``numpy.isclose(candidate, reference)``::

    |candidate - reference| <= atol + rtol * |reference|

Positions where both values are NaN, or both are the same infinity, are equal. Where only one side
is NaN or infinite, or the infinities have opposite signs, the element is a mismatch (counted in
``nan_or_inf_mismatch``) that no tolerance can excuse. All statistics are computed in float64 over
the elements that are finite in both outputs, aggregated over all samples:

* ``max_abs_error``, ``mean_abs_error``, ``median_abs_error`` of ``|candidate - reference|``;
* ``max_rel_error = max(|candidate - reference| / max(|reference|, atol))``. Dividing by
  ``max(|reference|, atol)`` instead of ``|reference|`` keeps the ratio finite where the reference
  is 0 (it becomes ``|difference| / atol`` there); only with ``atol == 0`` can a difference at a
  zero reference make it infinite;
* ``min_atol_to_pass``: the smallest atol that would pass with the rtol in use, and
  ``min_rtol_to_pass``: the smallest rtol that would pass with the atol in use (``inf`` when none
  can, e.g. a difference where the reference is exactly 0 and exceeds atol, or any NaN/Inf
  mismatch). Comparing again with them passes; they are minimal up to float rounding.

Default tolerances and why (when the user gives only one of atol/rtol)
----------------------------------------------------------------------
Folding changes the order of rounding, not the math: ``conv(x, W) * s + t`` becomes
``conv(x, W * s) + t'``, each side rounded differently. A correct fold therefore differs from the
original by about as much as the original differs from exact arithmetic, and that grows with depth
and with the magnitude of activations. The defaults were calibrated on a 50-layer residual network
of 3x3 Conv+BN+ReLU (25 blocks, 32 to 256 channels, realistic BN statistics) folded in float64 and
rounded once; the numbers below are the atol a *correct* fold needed at the listed rtol there:

================  ==========  ==========  =========================================================
dtype             atol        rtol        reasoning
================  ==========  ==========  =========================================================
float64           1e-9        1e-9        a correct fold is ~1e-15 off; this still catches a fold
                                          that was computed in float32 precision (~1e-7)
float32           1e-4        1e-4        a correct fold needed atol ~6e-6 at rtol 1e-4 (errors
                                          ~1e-5 on activations of magnitude ~8): 15x headroom for
                                          deeper/wider nets, still ~1000 ulp, so a wrong epsilon
                                          (~5e-4 relative) or a missing bias fails
float16           5e-2        1e-2        ORT rounds every fp16 activation, so a correct fold is
                                          ~1-2 ulp off at the activations' magnitude: it needed
                                          atol ~9e-3 at rtol 1e-2; rtol is ~10 eps
bfloat16          3e-1        8e-2        float16's budget scaled to bfloat16's 8x larger eps (ORT
                                          CPU runs few bfloat16 kernels, so not measured)
other floats      48 * eps    10 * eps    the same rule in units of the dtype's eps (float8 ...)
integers, bool    0           0           must be identical
================  ==========  ==========  =========================================================

Explicit ``atol``/``rtol`` arguments judge every output element-wise (the one not given takes the
default above); ``output_tolerances`` overrides both per output name. These fixed tolerances refuse
correct folds of deep nets (see ``benchmarks/mutations.py``), hence the calibrated default.

Layout
------
``inputs`` (input shapes, ``--data``, seeded inputs; shared with the benchmark and the localizer),
``statistics`` (tolerances and one output's comparison), ``verify`` (:func:`verify_models`).
"""

from __future__ import annotations

from .inputs import (  # noqa: F401  (private names kept reachable for bnfold.torch and tests)
    DISTRIBUTIONS,
    _InputSpec,
    _is_float,
    exercising_shapes,
    load_input_data,
    make_inputs,
    parse_input_shapes,
)
from .statistics import (  # noqa: F401
    OutputComparison,
    _Accumulator,
    check_tolerance,
    compare_outputs,
    default_tolerances,
)
from .verify import ModelSource, VerificationResult, verify_models  # noqa: F401

__all__ = [
    "OutputComparison",
    "VerificationResult",
    "compare_outputs",
    "default_tolerances",
    "make_inputs",
    "parse_input_shapes",
    "verify_models",
    "load_input_data",
    "DISTRIBUTIONS",
    "exercising_shapes",
]
