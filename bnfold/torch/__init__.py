"""PyTorch front end: fold BatchNorm in an ``nn.Module``, or export it to ONNX, fold and verify.

``torch`` is an optional extra (``pip install '.[torch]'`` in a checkout, or the CPU wheel:
``pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu``) and is imported
only inside the functions of this package, so ``import bnfold`` (and even ``import bnfold.torch``) never imports it.

Three entry points, each returning the same :class:`~bnfold.report.FoldReport` as the ONNX path::

    result = bnfold.torch.fold_module(model, (x,))        # ModuleFoldResult: .module, .report
    result = bnfold.torch.export(model, (x,), "m.onnx")   # FoldResult: folded, verified ONNX file
    result = bnfold.torch.fold_file("m.pt2", "m.onnx")    # the CLI's path: .pt2 / TorchScript / pickle

Where things live:

* :mod:`bnfold.torch.module_fold` -- ``fold_module`` (torch.fx), with ``_scopes`` (what can be
  traced), ``_folder`` (the per-call-site decisions and how a fold is applied), ``_forward``
  (forward folds into the next Conv/Linear), ``_concat`` (a BN split over concatenated Convs);
* :mod:`bnfold.torch.bn_like` -- what counts as a BatchNorm: BN subclasses that run batch_norm
  then modules (timm's BatchNormAct2d), frozen BNs, ``register_bn_like`` for named classes;
* ``_accounting`` -- ``export`` on the dynamo exporter: a decision for every BN module;
* :mod:`bnfold.torch.onnx_export` -- export → fold → verify against PyTorch → write;
* :mod:`bnfold.torch.files` -- ``.pt2`` / TorchScript / pickle sniffing and loading, ``fold_file``;
* ``_common`` -- the lazy torch import, module classification, state checks, tensor helpers.

The error classes live in :mod:`bnfold.errors` with every other error and are re-exported here.
"""

from __future__ import annotations

__all__ = [
    "ModuleFoldResult",
    "NoRunningStatsError",
    "TorchSource",
    "TorchUnavailableError",
    "TrainingModeError",
    "UnfoldableModuleError",
    "export",
    "fold_file",
    "fold_module",
    "is_torch_file",
    "load_torch_file",
    "register_bn_like",
    "unregister_bn_like",
]

from bnfold.errors import (
    NoRunningStatsError,
    TorchUnavailableError,
    TrainingModeError,
    UnfoldableModuleError,
)

from .bn_like import register_bn_like, unregister_bn_like
from .files import TorchSource, fold_file, is_torch_file, load_torch_file
from .module_fold import ModuleFoldResult, fold_module
from .onnx_export import export
