"""Real Keras/TensorFlow exporter output (issue 13): every Keras BN layer folds, exactly.

The fixtures in ``tests/data/keras`` are ONNX files made by the exporters people use (tf2onnx from
Keras 2 and Keras 3, Keras 3's own ``model.export(format="onnx")`` with the TensorFlow and the torch
backend, SavedModel + the tf2onnx CLI) from the Keras tutorial CNN, with random weights and BN
statistics far from identity; ``make_keras_fixtures.py`` beside them regenerates them (by hand, with
TensorFlow; CI needs none of it). ``MANIFEST.json`` says, per file, how many Keras BatchNormalization
layers the model has and which layer precedes each.

For every fixture that bnfold did not fold completely before issue 13 (``keras_checks.NOT_YET``: the
tutorial model from every route and Keras 3's torch-backend exports of the Conv->BN variant; the
lowered-BN pass, :mod:`bnfold.passes.affine`, made them fold), ``bnfold.fold`` reports every BN layer the exporter left
in the graph as a BatchNorm and folds all of them (backward into the Conv/Dense before it, or
forward through MaxPool/Flatten/Reshape/Transpose into the next Conv/Dense), the output passes
``onnx.checker``, matches the original under ONNX Runtime with optimizations disabled (and the Keras
model's own output), and no BN-like Mul/Add/Sub is left; ``bnfold check`` on an unfolded fixture exits
1 and lists every BN as foldable. The assertions are in ``keras_checks.py``; the fixtures bnfold
already folds run the same assertions, unmarked, in ``test_keras_fixtures.py``.
"""

from __future__ import annotations

import pytest
from keras_checks import NOT_YET, assert_check_flags_every_bn, assert_folds_every_bn


@pytest.mark.parametrize("name", NOT_YET)
def test_fold_folds_every_keras_bn(name):
    assert_folds_every_bn(name)


@pytest.mark.parametrize("name", NOT_YET)
def test_check_flags_every_unfolded_keras_bn(name, tmp_path):
    assert_check_flags_every_bn(name, tmp_path)
