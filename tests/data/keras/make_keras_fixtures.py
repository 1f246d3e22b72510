"""Regenerate the Keras/TensorFlow exporter fixtures in this folder (issue 13). Run by hand, not in CI.

What it makes: the Keras tutorial CNN, with deterministic random weights and randomized BatchNorm
statistics far from identity (gamma in [0.5, 2], beta in [-1, 1], moving mean in [-1, 1], moving
variance in [0.25, 4]; gamma > 0 so MaxPool commutes with every BN), exported to ONNX every way people
do it, as ``<route>_<padding>.onnx`` (and ``<route>_convbn_<padding>.onnx`` for the variant), plus
``MANIFEST.json`` (file, route, tool versions, opset/IR, Keras BN layers and the layer before each,
reference input/output magnitude) and ``reference_<model>_<padding>.npz`` (a fixed NHWC input and the
Keras model's own output on it; every route must reproduce it).

Models (input 28x28x1 NHWC, batch dimension dynamic, 10 classes):

* ``tutorial``: Conv2D(4,3) -> ReLU -> BN -> MaxPool(2) -> Conv2D(8,3) -> ReLU -> BN -> MaxPool(2)
  -> Flatten -> Dense(16) -> ReLU -> BN -> Dense(10). Every BN sits after an activation, so none folds
  backward: the first two fold forward through MaxPool (and Flatten) into the next Conv / Dense, the
  last one forward into the last Dense.
* ``convbn``: Conv2D(4,3) -> BN -> ReLU -> MaxPool(2) -> Conv2D(8,3) -> BN -> ReLU -> Flatten
  -> Dense(16) -> BN -> ReLU -> Dense(10): BN directly after Conv and directly after Dense (backward
  folds).

The Conv2D ``padding`` is ``valid`` or ``same`` (MaxPool is always ``valid``).

Routes (KERAS_BACKEND is read at import, so each backend runs in its own subprocess):

* ``tf2onnx_k3``: Keras 3 (TensorFlow backend) -> ``tf2onnx.convert.from_keras`` (falls back to
  ``tf2onnx.convert.from_function`` on ``tf.function(model)`` where from_keras rejects Keras 3; the
  manifest says which ran).
* ``tf2onnx_k2``: Keras 2 API (``tf_keras``) -> ``tf2onnx.convert.from_keras``.
* ``keras3_tf``: Keras 3, TensorFlow backend -> ``model.export(path, format="onnx")``.
* ``keras3_torch``: Keras 3, torch backend -> ``model.export(path, format="onnx")``. With the
  model's dynamic batch Keras uses torch's TorchScript exporter (``dynamo=False``).
* ``keras3_torch_dynamo``: the same with a static batch,
  ``model.export(path, format="onnx", input_signature=[keras.InputSpec(shape=(1, 28, 28, 1))])``:
  Keras then uses the dynamo exporter and ``onnx_program.optimize()``. Its input is ``[1, 28, 28, 1]``
  (named ``input_0``), so the reference batch of 2 runs one image at a time.
* ``savedmodel_k3``: Keras 3 ``model.export(dir, format="tf_saved_model")`` ->
  ``python -m tf2onnx.convert --saved-model dir --output f.onnx``.
* ``savedmodel_k2``: ``tf_keras`` model -> ``tf.saved_model.save`` -> the same tf2onnx CLI.

Every exporter runs with its defaults (opset, optimizer), as a user would run it.

Environment (a venv for fixture making only; never CI, nothing from it is committed)::

    python3 -m venv /work/venvs/tf
    /work/venvs/tf/bin/pip install tensorflow-cpu==2.21.0 keras==3.15.1 tf_keras==2.21.0 \
        tf2onnx==1.17.0 onnx onnxruntime onnxscript torch==2.13.0 -e .
    # torch==2.13.0 is the project's pinned CPU wheel (Keras 3's torch backend); never unpinned.
    # (resolved with them: onnx 1.23.2, onnxruntime 1.32.0, onnxscript 0.7.2, protobuf 7.36.2)

Command (from the repository root; about 5 minutes on 2 busy cores)::

    /work/venvs/tf/bin/python tests/data/keras/make_keras_fixtures.py

``--only ROUTE`` (repeatable) regenerates some routes and keeps the stored references;
``--keep-tmp`` keeps the SavedModels; ``--refresh-manifest`` re-describes the committed files
(onnx + onnxruntime only). Exports are numerically deterministic (same weights, same outputs) but not
byte-identical: tf2onnx numbers its node names per process. After regenerating, run
``python -m pytest tests/test_keras_fixtures.py tests/test_keras_exports.py``: the goal tests use
the manifest's counts, and ``keras_checks.FOLDED_TODAY`` names the files bnfold already folds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
INPUT_SHAPE = (28, 28, 1)
CLASSES = 10
MODELS = ("tutorial", "convbn")
PADDINGS = ("valid", "same")
# route -> (worker family, keras flavour)
ROUTES = {
    "tf2onnx_k3": "k3tf",
    "keras3_tf": "k3tf",
    "savedmodel_k3": "k3tf",
    "tf2onnx_k2": "k2",
    "savedmodel_k2": "k2",
    "keras3_torch": "k3torch",
    "keras3_torch_dynamo": "k3torch",
}
SEED = 1234


# ====================================================================== model definition (any Keras)
def layer_specs(model: str, padding: str) -> list[tuple[str, str, dict]]:
    """(name, kind, kwargs) for each layer; the same list builds the Keras 2 and Keras 3 models."""
    if model == "tutorial":
        return [
            ("conv1", "Conv2D", {"filters": 4, "kernel_size": 3, "padding": padding}),
            ("relu1", "ReLU", {}),
            ("bn1", "BatchNormalization", {}),
            ("pool1", "MaxPooling2D", {"pool_size": 2}),
            ("conv2", "Conv2D", {"filters": 8, "kernel_size": 3, "padding": padding}),
            ("relu2", "ReLU", {}),
            ("bn2", "BatchNormalization", {}),
            ("pool2", "MaxPooling2D", {"pool_size": 2}),
            ("flatten", "Flatten", {}),
            ("dense1", "Dense", {"units": 16}),
            ("relu3", "ReLU", {}),
            ("bn3", "BatchNormalization", {}),
            ("dense2", "Dense", {"units": CLASSES}),
        ]
    if model == "convbn":
        return [
            ("conv1", "Conv2D", {"filters": 4, "kernel_size": 3, "padding": padding}),
            ("bn1", "BatchNormalization", {}),
            ("relu1", "ReLU", {}),
            ("pool1", "MaxPooling2D", {"pool_size": 2}),
            ("conv2", "Conv2D", {"filters": 8, "kernel_size": 3, "padding": padding}),
            ("bn2", "BatchNormalization", {}),
            ("relu2", "ReLU", {}),
            ("flatten", "Flatten", {}),
            ("dense1", "Dense", {"units": 16}),
            ("bn3", "BatchNormalization", {}),
            ("relu3", "ReLU", {}),
            ("dense2", "Dense", {"units": CLASSES}),
        ]
    raise ValueError(model)


def bn_layers(model: str, padding: str) -> list[dict]:
    specs = layer_specs(model, padding)
    return [
        {"layer": name, "after": specs[i - 1][0], "after_kind": specs[i - 1][1]}
        for i, (name, kind, _) in enumerate(specs)
        if kind == "BatchNormalization"
    ]


def build(keras, model: str, padding: str):
    """Build the Sequential model and give it deterministic weights and BN statistics."""
    layers = [keras.Input(shape=INPUT_SHAPE, name="image")]
    for name, kind, kwargs in layer_specs(model, padding):
        layers.append(getattr(keras.layers, kind)(name=name, **kwargs))
    m = keras.Sequential(layers, name=f"{model}_{padding}")
    rng = np.random.default_rng([SEED, MODELS.index(model), PADDINGS.index(padding)])
    for layer in m.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            c = weights[0].shape[0]
            gamma = rng.uniform(0.5, 2.0, c)
            beta = rng.uniform(-1.0, 1.0, c)
            mean = rng.uniform(-1.0, 1.0, c)
            var = rng.uniform(0.25, 4.0, c)
            new = [gamma, beta, mean, var]
        else:
            kernel, bias = weights
            fan_in = int(np.prod(kernel.shape[:-1]))
            new = [
                rng.normal(0.0, 1.0 / np.sqrt(fan_in), kernel.shape),
                rng.uniform(-0.2, 0.2, bias.shape),
            ]
        layer.set_weights([w.astype(np.float32) for w in new])
    return m


def reference_input(model: str, padding: str) -> np.ndarray:
    rng = np.random.default_rng([SEED, 99, MODELS.index(model), PADDINGS.index(padding)])
    return rng.uniform(0.0, 1.0, (2, *INPUT_SHAPE)).astype(np.float32)


# ============================================================================ workers (subprocesses)
def _tf2onnx_cli(saved_model: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model)]
    cmd += ["--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"tf2onnx CLI failed:\n{proc.stderr[-4000:]}")
    return {"command": "python -m tf2onnx.convert --saved-model DIR --output FILE"}


def worker(family: str, routes: list[str], outdir: Path, tmp: Path) -> dict:
    """Runs in a subprocess whose KERAS_BACKEND / imports fit ``family``; returns per-file info."""
    import tensorflow as tf

    if family == "k2":
        import tf_keras as keras
    else:
        import keras
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    try:
        import tf2onnx

        versions["tf2onnx"] = tf2onnx.__version__
    except ImportError:  # pragma: no cover - the torch worker may run without it
        pass
    if family == "k3torch":
        import torch

        versions["torch"] = torch.__version__
        versions["keras_backend"] = keras.backend.backend()
    elif family == "k3tf":
        versions["keras_backend"] = keras.backend.backend()
    results: dict[str, dict] = {}
    for model in MODELS:
        for padding in PADDINGS:
            m = build(keras, model, padding)
            x = reference_input(model, padding)
            y = np.asarray(keras.ops.convert_to_numpy(m(x, training=False)))
            for route in routes:
                stem = f"{route}_{padding}" if model == "tutorial" else f"{route}_{model}_{padding}"
                out = outdir / f"{stem}.onnx"
                info = {"route": route, "model": model, "padding": padding, "versions": versions}
                try:
                    info.update(export(route, keras, tf, m, out, tmp / stem))
                except Exception as exc:  # record the failure; the orchestrator reports it
                    info["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                info["keras_output"] = y.tolist()
                results[out.name] = info
    return results


def export(route: str, keras, tf, m, out: Path, tmp: Path) -> dict:
    spec = (tf.TensorSpec((None, *INPUT_SHAPE), tf.float32, name="image"),)
    if route in ("tf2onnx_k3", "tf2onnx_k2"):
        import tf2onnx

        try:
            tf2onnx.convert.from_keras(m, input_signature=spec, output_path=str(out))
            return {"api": "tf2onnx.convert.from_keras(model, input_signature, output_path)"}
        except Exception as exc:
            if route == "tf2onnx_k2":
                raise
            fn = tf.function(lambda image: m(image, training=False), input_signature=spec)
            tf2onnx.convert.from_function(fn, input_signature=spec, output_path=str(out))
            return {
                "api": "tf2onnx.convert.from_function(tf.function(model), input_signature)",
                "from_keras_error": f"{type(exc).__name__}: {exc}"[:500],
            }
    if route in ("keras3_tf", "keras3_torch"):
        m.export(str(out), format="onnx")
        return {"api": 'model.export(path, format="onnx")'}
    if route == "keras3_torch_dynamo":
        spec = [keras.InputSpec(shape=(1, *INPUT_SHAPE), dtype="float32")]
        m.export(str(out), format="onnx", input_signature=spec)
        return {
            "api": 'model.export(path, format="onnx", input_signature=[InputSpec((1, 28, 28, 1))])'
        }
    if route == "savedmodel_k3":
        m.export(str(tmp), format="tf_saved_model")
        return {"api": 'model.export(dir, format="tf_saved_model")', **_tf2onnx_cli(tmp, out)}
    if route == "savedmodel_k2":
        tf.saved_model.save(m, str(tmp))
        return {"api": "tf.saved_model.save(tf_keras model, dir)", **_tf2onnx_cli(tmp, out)}
    raise ValueError(route)


# ================================================================================== orchestrator
def _family_env(family: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    env["KERAS_BACKEND"] = "torch" if family == "k3torch" else "tensorflow"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONHASHSEED"] = "0"
    return env


def describe(path: Path, info: dict) -> dict:
    """Check the file with onnx + onnxruntime and summarize it for the manifest."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    opsets = {d.domain or "ai.onnx": d.version for d in proto.opset_import}
    inputs = [
        {
            "name": i.name,
            "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
        }
        for i in proto.graph.input
    ]
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    # BN layers the exporter left in the graph: each is one BatchNormalization node or one Mul by a
    # constant (these models have no other Mul); tf2onnx fuses a FusedBatchNormV3 right after a
    # Conv into the Conv itself (its output then carries the BN's name).
    consts = {i.name for i in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    bn_nodes = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    bn_muls = [
        n for n in proto.graph.node if n.op_type == "Mul" and any(i in consts for i in n.input)
    ]
    fused = [
        b["layer"]
        for b in bn_layers(info["model"], info["padding"])
        if any(
            n.op_type == "Conv" and any(f"/{b['layer']}/FusedBatchNorm" in o for o in n.output)
            for n in proto.graph.node
        )
    ]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = reference_input(info["model"], info["padding"])
    name, batch = sess.get_inputs()[0].name, sess.get_inputs()[0].shape[0]
    if batch == 1:  # a static batch of 1: run the reference images one at a time
        y = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    else:
        y = sess.run(None, {name: x})[0]
    ref = np.asarray(info["keras_output"], dtype=np.float32)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "ir_version": proto.ir_version,
        "opset": opsets,
        "inputs": inputs,
        "outputs": [o.name for o in proto.graph.output],
        "op_counts": dict(sorted(ops.items())),
        "onnx_bn_layers": len(bn_nodes) + len(bn_muls),
        "onnx_bn_forms": {"BatchNormalization": len(bn_nodes), "Mul+Add": len(bn_muls)},
        "exporter_fused_bn": fused,
        "max_abs_vs_keras": float(np.max(np.abs(y - ref))),
        "output_max_abs": float(np.max(np.abs(ref))),
        "output_mean_abs": float(np.mean(np.abs(ref))),
    }


def refresh_manifest(outdir: Path) -> int:
    path = outdir / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    for name, entry in manifest["files"].items():
        if "error" in entry:
            continue
        with np.load(outdir / f"reference_{entry['model']}_{entry['padding']}.npz") as ref:
            info = {"model": entry["model"], "padding": entry["padding"]}
            info["keras_output"] = ref["output"]
            entry.update(describe(outdir / name, info))
        assert entry["onnx_bn_layers"] + len(entry["exporter_fused_bn"]) == entry["keras_bn_layers"]
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=sorted(ROUTES), help="route(s) to rebuild")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument(
        "--refresh-manifest",
        action="store_true",
        help="re-describe the files already listed in MANIFEST.json (no export; needs no TensorFlow)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--routes", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(args.worker, args.routes.split(","), args.out, args.tmp)
        args.result.write_text(json.dumps(res))
        return 0

    if args.refresh_manifest:
        return refresh_manifest(args.out)

    routes = args.only or list(ROUTES)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="keras_fixtures_"))
    results: dict[str, dict] = {}
    try:
        for family in ("k3tf", "k2", "k3torch"):
            fam_routes = [r for r in routes if ROUTES[r] == family]
            if not fam_routes:
                continue
            result = tmp / f"{family}.json"
            cmd = [sys.executable, __file__, "--worker", family, "--routes", ",".join(fam_routes)]
            cmd += ["--out", str(args.out), "--tmp", str(tmp), "--result", str(result)]
            print(f"== {family}: {', '.join(fam_routes)}", flush=True)
            proc = subprocess.run(cmd, env=_family_env(family), check=False)
            if proc.returncode != 0 or not result.exists():
                print(f"worker {family} failed (exit {proc.returncode})", file=sys.stderr)
                continue
            results.update(json.loads(result.read_text()))
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    manifest_path = args.out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    for name, info in sorted(results.items()):
        entry = {k: info[k] for k in ("route", "model", "padding", "versions")}
        entry.update({k: info[k] for k in ("api", "command", "from_keras_error") if k in info})
        entry["keras_bn_layers"] = len(bn_layers(info["model"], info["padding"]))
        entry["bn_layers"] = bn_layers(info["model"], info["padding"])
        if "error" in info:
            entry["error"] = info["error"]
            print(f"{name}: export FAILED: {info['error'].splitlines()[0]}", file=sys.stderr)
        else:
            entry.update(describe(args.out / name, info))
            print(
                f"{name}: {entry['bytes']} bytes, opset {entry['opset']}, "
                f"|onnx - keras| = {entry['max_abs_vs_keras']:.2e}"
            )
        manifest["files"][name] = entry
    for model in MODELS:
        for padding in PADDINGS:
            ref = next(
                (i for i in results.values() if (i["model"], i["padding"]) == (model, padding)),
                None,
            )
            npz = args.out / f"reference_{model}_{padding}.npz"
            # --only keeps the stored references (all routes must match the same Keras output)
            if ref is not None and (not args.only or not npz.exists()):
                np.savez(
                    npz,
                    image=reference_input(model, padding),
                    output=np.asarray(ref["keras_output"], dtype=np.float32),
                )
    manifest["generator"] = "tests/data/keras/make_keras_fixtures.py"
    manifest["models"] = {m: [s[0] + ":" + s[1] for s in layer_specs(m, "valid")] for m in MODELS}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
