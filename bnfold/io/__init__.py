"""Loading and saving models: the only package that touches ``onnx`` protobuf.

Loading validates before it trusts; saving is atomic and crash-safe. One module per job:

- :mod:`~bnfold.io.validate`: structure, tensor and value-info checks of an untrusted ModelProto,
  the external-data firewall (every reference stays inside the model's folder) and the data budget
  (no sparse-file bombs, nothing beyond the machine's memory and disk).
- :mod:`~bnfold.io.load`: :func:`load` a file (validated, weights memory-mapped by onnx_ir),
  :func:`from_proto`, :func:`from_bytes`, :func:`to_proto`, and the external-data queries.
- :mod:`~bnfold.io.paths`: output and report destinations checked before anything is written.
- :mod:`~bnfold.io.staging`: :class:`StagedOutput` (write in a private staging folder, commit under
  a folder lock: data first, then the model with one ``os.replace``), the protection of inputs
  (:func:`protecting`, :func:`input_files`) and the removal of stale staging folders.
- :mod:`~bnfold.io.save`: writing straight to a path (originals staged for verification), and
  :func:`needs_external_data`.
- :mod:`~bnfold.io.walk`: walkers over every graph and tensor of a ModelProto.

Every name below is reachable as ``bnfold.io.NAME``. The commit steps ``_publish_data``,
``_replace_model`` and ``_remove_files`` are looked up here by :meth:`StagedOutput.commit` each time
it runs, so replacing them on this package (as the crash test does) takes effect.
"""

from __future__ import annotations

__all__ = [
    "load",
    "from_proto",
    "to_proto",
    "model_bytes_estimate",
    "has_external_data",
    "external_data_files",
    "check_output_path",
    "check_report_path",
    "protecting",
    "input_files",
    "check_data_budget",
    "StagedOutput",
    "remove_stale_staging",
    "TWO_GB",
]

# ``name as name``: re-exported on purpose, also the names outside ``__all__`` (``from_bytes``,
# ``needs_external_data``, ``save_ir_to``, ``save_proto_to``, as before the split) and the private
# ones that tests patch (the commit steps) or use (``_iter_tensor_protos``).
from .load import external_data_files as external_data_files
from .load import from_bytes as from_bytes
from .load import from_proto as from_proto
from .load import has_external_data as has_external_data
from .load import load as load
from .load import model_bytes_estimate as model_bytes_estimate
from .load import to_proto as to_proto
from .paths import check_output_path as check_output_path
from .paths import check_report_path as check_report_path
from .save import needs_external_data as needs_external_data
from .save import save_ir_to as save_ir_to
from .save import save_proto_to as save_proto_to
from .staging import StagedOutput as StagedOutput
from .staging import _publish_data as _publish_data
from .staging import _remove_files as _remove_files
from .staging import _replace_model as _replace_model
from .staging import input_files as input_files
from .staging import protecting as protecting
from .staging import remove_stale_staging as remove_stale_staging
from .validate import TWO_GB as TWO_GB
from .validate import check_data_budget as check_data_budget
from .walk import _iter_tensor_protos as _iter_tensor_protos
