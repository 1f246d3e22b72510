"""The BatchNormalization folding pass (an ``onnx_ir`` in-place pass).

For every ``BatchNormalization`` node the pass decides *fold or keep, and why*; a non-match is data
(a :class:`~bnfold.report.BNDecision` with a :class:`~bnfold.reasons.SkipReason`), never an
exception. The formulas live in :mod:`bnfold.numerics`; this package matches graph patterns and
rewires. Where to find what:

- ``fold_pass``      :class:`BatchNormFoldPass`: walks the graphs, arbitrates per BN
  (backward → forward → keep, then lowering), returns a :class:`FoldPassResult`
- ``context``        the per-run state (names, scopes, undo stack, dead values, decisions)
- ``bnparams``       is a BN an inference BN with constant parameters; its (s, t)
- ``constants``      resolving a value to a constant (``const_eval``: the evaluator, per op family)
- ``shapes``         static shapes and dtypes (declared, else ONNX shape inference, once per run)
- ``weights``        lazy folded weights; "check the range, then fold lazily"
- ``backward``       folds into the producer: Conv, ConvTranspose, Gemm, MatMul, MatMul + Add
- ``flattened``      folds through a Reshape/Flatten merging leading axes into a MatMul (LeViT)
- ``concat``         folds a BN after a channel Concat of Convs, split by slices (mixnet)
- ``branch``         identity-branch BNs summed with a sibling Conv: into its centre tap (RepVGG)
- ``forward``        planning a forward fold through MaxPool/AveragePool/Dropout/Flatten/Reshape…
- ``forward_targets`` the Conv, Gemm and MatMul a forward fold folds into (border correction too)
- ``decomposed``     Mul/Add/Sub/Div chains that are a BN in disguise, right after their producer
- ``affine``         such chains anywhere else (Keras/TF exports): backward, forward or kept
- ``layout``         the channel axis through Transpose and no-op Cast/Identity
- ``shape_vectors``  Reshape shapes computed from ``Shape`` (a dynamic batch), evaluated symbolically
- ``lowering``       a kept inference BN rewritten as Mul + Add
- ``rewiring``       graph surgery: new constants, bypass, copies, dead values, names
- ``sharing``        the fold's bit-identical small constants become one initializer
- ``common``         dtype tables, attribute readers, labels
"""

from __future__ import annotations

__all__ = ["BatchNormFoldPass", "FoldPassResult", "FoldedTensor", "MAX_BORDER_CORRECTION"]

from .fold_pass import BatchNormFoldPass, FoldPassResult
from .forward_targets import MAX_BORDER_CORRECTION
from .weights import FoldedTensor
