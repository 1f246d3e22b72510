"""Find where two models first disagree: expose the tensors they share, compare them in order.

When :func:`bnfold.compare.verify_models` says the outputs differ, :func:`localize` says *where*: it
runs both models once more with their shared intermediate tensors added as graph outputs, compares
every shared tensor exactly as verification compares outputs, and names the first one that fails
together with the node that produces it.

What is compared
----------------
*Shared tensors* are node outputs of the main graph (not of If/Loop bodies) that have the same name
in both models, taken in the candidate's node order (ONNX requires nodes to be topologically sorted,
so every tensor comes after everything it depends on). "First" therefore means: every compared
tensor upstream of the reported one matched.

Only floating-point tensors are compared (integer/bool tensors are shapes, indices and masks, not
activations). Exported models often declare no type for intermediate values; those are exposed
anyway, because ONNX Runtime infers the type of a graph output from the node that produces it
(checked with onnxruntime 1.32), and the types ORT then reports decide what is floating-point. No
ONNX shape inference is needed. Should ORT refuse the untyped outputs, the run is retried with only
the values whose type the model declares.

Tensors are compared with :func:`bnfold.compare.compare_outputs` on the same seeded inputs
verification uses (:func:`bnfold.compare.make_inputs` from the reference's inputs), with the default
tolerance of their dtype unless ``atol``/``rtol`` are given. Both models run under ONNX Runtime CPU
with graph optimizations disabled, one session after the other.

After a fold, names do not line up one to one
---------------------------------------------
A fold removes ``BatchNormalization``; its role passes to the producer it was folded into. bnfold's
fold keeps the Conv's output name: the reference computes ``X = Conv(x, W)`` and
``Y = BatchNormalization(X)``, the candidate ``X = Conv(x, W')`` with no ``Y``. Comparing the two
``X`` by name would report a difference after every correct fold. So when, in the reference, a
shared tensor ``X`` feeds nothing but a ``BatchNormalization`` whose output is gone from the
candidate (a folded BN; chains of them are followed), the candidate's ``X`` is compared with the
reference's BN output ``Y`` instead (``Divergence.reference_tensor`` then differs from
``Divergence.tensor``). That names the folded Conv itself when its weights are wrong. If the
candidate's producer of ``X`` looks unchanged (same op type and input names, as after a fold that
rewrites weights in place, or a forward fold where ``X`` is the BN's unchanged input), ``X`` passes
when it matches either ``X`` or ``Y`` of the reference.

A fold that renames tensors instead (e.g. the Conv takes over the BN's output name) leaves no shared
name for the Conv's own output; the first diverging shared tensor is then the next one downstream.
To point at the cause either way, a :class:`Divergence` carries the producer of the tensor in both
models (``candidate_producer``, ``reference_producer``) and the *upstream chains*: the nodes between
the diverging tensor and the nearest tensors that matched (``candidate_chain``,
``reference_chain``, topological order, at most 32 nodes each, the nearest kept). The folded Conv
is in the candidate's chain, the Conv and BN it replaced in the reference's.

Memory and disk
---------------
Exposed tensors are all held at once: the reference's until the candidate has run. That is fine for
CNNs at batch 1; for large graphs at most ``chunk_size`` tensors (2000 by default) are exposed per
run, in topological order, and the search stops at the first chunk with a difference (each further
chunk costs one more run of each model). A model without external data goes to ONNX Runtime as
bytes. A model with external data (or one too large for one protobuf) is written once into a
temporary folder with its weights as external data, and only its small graph file is rewritten per
chunk; the temporary folder is removed at the end.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfold import _ort
from bnfold import io as _io
from bnfold.compare import OutputComparison, check_tolerance, compare_outputs, make_inputs
from bnfold.errors import InvalidModelError, UsageError
from bnfold.render.text import inert

__all__ = ["DEFAULT_CHUNK_SIZE", "Divergence", "LocalizeResult", "Producer", "localize"]

logger = logging.getLogger(__name__)

#: Most tensors exposed in one run of a model; more shared tensors are checked in several runs.
DEFAULT_CHUNK_SIZE = 2000
_MAX_CHAIN = 32  # nodes kept in an upstream chain (the nearest to the diverging tensor)


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Producer:
    """A node that produces a tensor: its name (``"<OpType → output>"`` when it has none) and op."""

    name: str
    op_type: str
    domain: str = ""

    def __str__(self) -> str:
        return self.name if self.name.startswith("<") else f"{self.name} ({self.op_type})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "domain": self.domain}


@dataclass(frozen=True)
class Divergence:
    """The first shared tensor whose values differ, and who produces it.

    ``tensor`` is the candidate's tensor name; ``reference_tensor`` the reference tensor it was
    compared with (the same name, or the output of a BatchNormalization folded into ``tensor``'s
    producer: see the module docstring). ``node``/``op_type`` name the candidate's producer (as does
    ``candidate_producer``). ``comparison`` holds the error statistics of that tensor. ``checked``
    is how many shared tensors were compared, this one included (all others matched).
    ``candidate_chain``/``reference_chain`` list the nodes between this tensor and the nearest
    upstream tensors that matched, in topological order: where the difference arose.
    """

    tensor: str
    node: str
    op_type: str
    comparison: OutputComparison
    checked: int
    reference_tensor: str
    candidate_producer: Producer
    reference_producer: Producer
    candidate_chain: tuple[Producer, ...] = ()
    reference_chain: tuple[Producer, ...] = ()

    def describe(self) -> str:
        """One line for a terminal or a log."""
        c = self.comparison
        where = f"tensor {self.tensor!r} produced by {self.candidate_producer}"
        if self.reference_tensor != self.tensor:
            where += f" (compared with the reference's {self.reference_tensor!r})"
        if c.message:
            return f"first divergence at {where}: {c.message}"
        return (
            f"first divergence at {where}: max abs error {c.max_abs_error:.3g}, "
            f"{c.mismatched}/{c.elements} elements out of tolerance (atol={c.atol:g}, rtol={c.rtol:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the comparison as :meth:`OutputComparison.to_dict`)."""
        return {
            "tensor": self.tensor,
            "reference_tensor": self.reference_tensor,
            "node": self.node,
            "op_type": self.op_type,
            "checked": self.checked,
            "candidate_producer": self.candidate_producer.to_dict(),
            "reference_producer": self.reference_producer.to_dict(),
            "candidate_chain": [p.to_dict() for p in self.candidate_chain],
            "reference_chain": [p.to_dict() for p in self.reference_chain],
            "comparison": self.comparison.to_dict(),
        }


@dataclass(frozen=True)
class LocalizeResult:
    """The outcome of :func:`localize`; **truthy when a divergence was found**.

    Note the polarity: a :class:`~bnfold.compare.VerificationResult` is truthy when the models
    agree, a ``LocalizeResult`` when it located a disagreement (``if result: print(result.divergence)``).

    ``shared`` counts the shared tensors that were candidates for comparison (names in both main
    graphs, not declared non-float); ``checked`` those actually compared (ORT reported a float type,
    and the search had not stopped yet). ``message`` says why there is no divergence: every checked
    tensor matched, nothing is shared, or a model could not be run (then ``checked`` may be 0).
    """

    divergence: Divergence | None
    checked: int
    shared: int
    message: str | None = None
    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def found(self) -> bool:
        return self.divergence is not None

    def __bool__(self) -> bool:
        return self.divergence is not None

    def __repr__(self) -> str:
        from bnfold.render import summary

        return summary.one_line("LocalizeResult", summary.localize(self))

    def _repr_markdown_(self) -> str:
        from bnfold.render.text import md_inert

        return md_inert(self.describe(), line_start=True)

    def describe(self) -> str:
        """One line: the divergence, or why there is none."""
        if self.divergence is not None:
            return self.divergence.describe()
        return self.message or "no divergence found"

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "divergence": None if self.divergence is None else self.divergence.to_dict(),
            "checked": self.checked,
            "shared": self.shared,
            "message": self.message,
            "seed": self.seed,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "seconds": self.seconds,
        }


# --- the graphs ------------------------------------------------------------------------------------


class _Index:
    """Main-graph lookups of one model: producer, value and topological position by tensor name."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.producers: dict[str, ir.Node] = {}
        self.values: dict[str, ir.Value] = {}
        self.position: dict[int, int] = {}  # id(node) -> index in node order
        self.order: list[str] = []  # node outputs in node order
        for i, node in enumerate(model.graph):
            self.position[id(node)] = i
            for value in node.outputs:
                if value.name:  # omitted optional outputs have no name
                    self.producers[value.name] = node
                    self.values[value.name] = value
                    self.order.append(value.name)

    def producer(self, name: str) -> Producer:
        return _producer(self.producers[name])

    def chain(self, start: str, stop: set[str]) -> tuple[Producer, ...]:
        """Producers upstream of ``start`` up to tensors in ``stop``, nearest first, then sorted."""
        first = self.producers[start]
        seen, queue, found = {id(first)}, deque([first]), []
        while queue and len(found) < _MAX_CHAIN:
            node = queue.popleft()
            found.append(node)
            for value in node.inputs:
                if value is None or not value.name or value.name in stop:
                    continue
                producer = self.producers.get(value.name)
                if producer is not None and id(producer) not in seen:
                    seen.add(id(producer))
                    queue.append(producer)
        found.sort(key=lambda n: self.position[id(n)])
        return tuple(_producer(n) for n in found)


def _producer(node: ir.Node) -> Producer:
    output = next((v.name for v in node.outputs if v.name), "?")
    return Producer(node.name or f"<{node.op_type} → {output}>", node.op_type, node.domain or "")


def _declared_float(value: ir.Value) -> bool | None:
    """True/False when the model declares the value's element type, None when it does not."""
    dtype = value.dtype
    return None if dtype is None else bool(dtype.is_floating_point())


def _same_producer(name: str, cand: _Index, ref: _Index) -> bool:
    a, b = cand.producers[name], ref.producers[name]

    def inputs(n: ir.Node) -> list[str]:
        return [v.name if v is not None and v.name else "" for v in n.inputs]

    return (a.op_type, a.domain or "", inputs(a)) == (b.op_type, b.domain or "", inputs(b))


def _folded_bn_outputs(name: str, cand: _Index, ref: _Index) -> list[str]:
    """Outputs of the reference BNs that consume only ``name`` (in a chain) and are gone from the
    candidate: the tensors ``name`` stands for after a fold that kept the producer's output name."""
    outputs: list[str] = []
    value = ref.values[name]
    while True:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            break
        node, index = uses[0].node, uses[0].idx
        if (
            node.op_type != "BatchNormalization"
            or (node.domain or "") not in ("", "ai.onnx")
            or index != 0
            or node.graph is not ref.graph
        ):
            break
        out = node.outputs[0]
        if not out.name or out.name in cand.values or out.name in outputs:
            break
        outputs.append(out.name)
        value = out
    return outputs


def _shared(cand: _Index, ref: _Index) -> list[tuple[str, tuple[str, ...]]]:
    """``(candidate tensor, reference tensors it may equal, preferred first)`` in candidate order."""
    shared = []
    for name in cand.order:
        if name not in ref.values or _declared_float(cand.values[name]) is False:
            continue
        folded = _folded_bn_outputs(name, cand, ref)
        if not folded:
            counterparts: tuple[str, ...] = (name,)
        elif _same_producer(name, cand, ref):
            # bnfold keeps the folded weight's name, so a backward fold looks like this too:
            # the BN's output is the likelier counterpart, X itself the alternative.
            counterparts = (folded[-1], name)
        else:
            counterparts = (folded[-1],)
        counterparts = tuple(c for c in counterparts if _declared_float(ref.values[c]) is not False)
        if counterparts:
            shared.append((name, counterparts))
    return shared


# --- loading and staging ---------------------------------------------------------------------------


def _load(model: Any, what: str, work: Path) -> ir.Model:
    """A model we may change (its graph outputs only): path, ModelProto, bytes or onnx_ir.Model."""
    if isinstance(model, (str, os.PathLike)):
        return _io.load(model)
    if isinstance(model, ir.Model):
        return model  # outputs are restored after every use; weights are never touched
    if isinstance(model, (bytes, bytearray, memoryview)):
        path = work / f"{what}-input.onnx"
        path.write_bytes(bytes(model))
        return _io.load(path)
    if type(model).__name__ == "ModelProto":
        return _io.from_proto(model)
    raise UsageError(
        f"cannot localize with a {type(model).__name__} as {what}: give a path, an "
        "onnx.ModelProto, the bytes of one, or an onnx_ir.Model"
    )


class _Stage:
    """One model, handed to ONNX Runtime with chosen tensors added as graph outputs."""

    def __init__(self, model: ir.Model, values: dict[str, ir.Value], folder: Path) -> None:
        self._model = model
        self._values = values  # node outputs of the main graph by name
        self._typed = {name for name, value in values.items() if value.dtype is not None}
        self._folder = folder
        self._external = _io.needs_external_data(model)
        self._staged = False

    def source(self, names: Sequence[str]) -> str | bytes:
        """A path (external data beside it) or serialized bytes of the model exposing ``names``."""
        path = self._folder / "model.onnx"
        if self._external and not self._staged:
            # Weights are written once; later calls only rewrite the graph file next to them.
            self._folder.mkdir(parents=True, exist_ok=True)
            ir.save(self._model, path, external_data=path.name + ".data")
            self._model = _io.load(path)
            self._values = _Index(self._model).values
            self._staged = True
        outputs = self._model.graph.outputs
        existing = {v.name for v in outputs}
        added = 0
        try:
            for name in names:
                if name not in existing:
                    outputs.append(self._values[name])
                    existing.add(name)
                    added += 1
            proto = _io.to_proto(self._model)
        finally:
            for _ in range(added):
                outputs.pop()
        if self._external:
            _io.save_proto_to(proto, path)
            return str(path)
        return proto.SerializeToString()

    def session(self, names: Sequence[str]) -> Any:
        """An ORT session exposing ``names``; retried with only the typed ones if ORT refuses."""
        try:
            return _ort.make_session(self.source(names), level="disable")
        except InvalidModelError:
            fallback = [n for n in names if n in self._typed]
            if len(fallback) == len(names):
                raise
            logger.info("ORT refused untyped graph outputs; exposing only the typed ones")
            return _ort.make_session(self.source(fallback), level="disable")


def _is_float_type(ort_type: str) -> bool:
    try:
        dtype = _ort.ort_type_to_numpy(ort_type)
    except ValueError:
        return False
    return dtype.kind == "f" or "float" in dtype.name  # ml_dtypes floats have kind "V"


# --- the search ------------------------------------------------------------------------------------


def localize(
    reference: Any,
    candidate: Any,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LocalizeResult:
    """Find the first tensor, in topological order, where ``candidate`` stops matching ``reference``.

    Args:
        reference, candidate: a path (external data next to it keeps working; it is memory-mapped),
            an ``onnx.ModelProto``, the bytes of one, or an ``onnx_ir.Model`` (its graph outputs
            are changed while it is serialized and restored; nothing else is touched).
        input_shapes: full shapes for inputs with dynamic dimensions (others default to 1), as for
            :func:`bnfold.compare.verify_models`.
        seed: seed of the random inputs (the same inputs ``verify_models`` uses for its first batch).
        atol, rtol: override the per-dtype default tolerances for every tensor.
        chunk_size: most tensors exposed per run (see "Memory and disk" in the module docstring).

    Returns a :class:`LocalizeResult`, truthy when a divergence was found. A model that ONNX
    Runtime cannot load or run is reported in ``message``, not raised. Raises
    :class:`~bnfold.errors.BnfoldError` for bad input (missing or invalid files, bad shapes or
    tolerances).
    """
    started = time.perf_counter()
    search = _Search(
        atol=None if atol is None else check_tolerance(atol, "atol"),
        rtol=None if rtol is None else check_tolerance(rtol, "rtol"),
        seed=seed,
        input_shapes=input_shapes,
    )
    chunk_size = _check_chunk_size(chunk_size)

    def result(
        divergence: Divergence | None, shared: int, message: str | None = None
    ) -> LocalizeResult:
        outcome = LocalizeResult(
            divergence=divergence,
            checked=search.checked,
            shared=shared,
            message=message,
            seed=seed,
            input_shapes=search.used_shapes,
            seconds=time.perf_counter() - started,
        )
        logger.info("localize: %s", inert(outcome.describe()))
        return outcome

    work = Path(tempfile.mkdtemp(prefix="bnfold-localize-"))
    try:
        plan = search.prepare(reference, candidate, work)
        if not plan:
            return result(
                None, 0, "the models share no floating-point tensor names; nothing to compare"
            )
        for start in range(0, len(plan), chunk_size):
            try:
                divergence = search.check_chunk(plan[start : start + chunk_size])
            except _CannotRun as failure:
                return result(None, len(plan), str(failure))
            if divergence is not None:
                return result(divergence, len(plan))
        message = (
            f"all {search.checked} compared shared tensors match (of {len(plan)} shared); the "
            "difference, if any, arises in tensors the models name differently"
        )
        return result(None, len(plan), message)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_chunk_size(chunk_size: Any) -> int:
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise UsageError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return int(chunk_size)


class _CannotRun(Exception):
    """ONNX Runtime cannot load or run one of the models: the search ends with this message."""


_Plan = list[tuple[str, tuple[str, ...]]]  # (candidate tensor, reference counterparts)


@dataclass
class _Search:
    """One search's settings and state: both models (indexed and staged), the inputs, how many
    tensors were compared, and the tensors that matched (where upstream chains stop)."""

    atol: float | None
    rtol: float | None
    seed: int
    input_shapes: Mapping[str, tuple[int, ...]] | None
    used_shapes: dict[str, list[int]] = field(default_factory=dict)
    checked: int = 0
    feeds: dict[str, np.ndarray] | None = None
    passed_cand: set[str] = field(default_factory=set)
    passed_ref: set[str] = field(default_factory=set)
    # Set by prepare():
    ref: _Index = field(init=False)
    cand: _Index = field(init=False)
    ref_stage: _Stage = field(init=False)
    cand_stage: _Stage = field(init=False)

    def prepare(self, reference: Any, candidate: Any, work: Path) -> _Plan:
        """Load both models and return the shared tensors to compare, in candidate order."""
        ref_model = _load(reference, "reference", work)
        cand_model = _load(candidate, "candidate", work)
        self.ref, self.cand = _Index(ref_model), _Index(cand_model)
        self.ref_stage = _Stage(ref_model, self.ref.values, work / "reference")
        self.cand_stage = _Stage(cand_model, self.cand.values, work / "candidate")
        return _shared(self.cand, self.ref)

    def check_chunk(self, chunk: _Plan) -> Divergence | None:
        """Run both models exposing one chunk of shared tensors; the first that differs, if any."""
        expected = self._run_reference(chunk)
        items = [(n, tuple(c for c in cps if c in expected)) for n, cps in chunk]
        items = [(n, cps) for n, cps in items if cps]
        if not items:
            return None
        produced = self._run_candidate([n for n, _ in items])
        return self._first_difference(items, expected, produced)

    def _run_reference(self, chunk: _Plan) -> dict[str, np.ndarray]:
        """Run the reference, keep its floating-point tensors, drop the session."""
        wanted = list(dict.fromkeys(c for _, counterparts in chunk for c in counterparts))
        session = None
        try:
            session = self.ref_stage.session(wanted)
            if self.feeds is None:
                self.feeds = make_inputs(
                    session.get_inputs(), input_shapes=self.input_shapes, seed=self.seed
                )
                self.used_shapes.update(
                    {k: [int(d) for d in v.shape] for k, v in self.feeds.items()}
                )
            floats = [o.name for o in session.get_outputs() if _is_float_type(o.type)]
            floats = [n for n in floats if n in set(wanted)]
            return dict(zip(floats, _ort.run(session, self.feeds, floats), strict=True))
        except (InvalidModelError, _ort.OrtRunError) as error:
            raise _CannotRun(
                f"ONNX Runtime cannot run the reference model: {_ort.error_reason(error)}"
            ) from None
        finally:
            session = None
            gc.collect()

    def _run_candidate(self, wanted: list[str]) -> dict[str, np.ndarray]:
        """Run the candidate exposing ``wanted`` (those ORT accepts), drop the session."""
        assert self.feeds is not None
        session = None
        try:
            session = self.cand_stage.session(wanted)
            exposed = {o.name for o in session.get_outputs()}
            names = [n for n in wanted if n in exposed]
            return dict(zip(names, _ort.run(session, self.feeds, names), strict=True))
        except (InvalidModelError, _ort.OrtRunError) as error:
            raise _CannotRun(
                f"ONNX Runtime cannot run the candidate model: {_ort.error_reason(error)}"
            ) from None
        finally:
            session = None
            gc.collect()

    def _first_difference(
        self,
        items: _Plan,
        expected: dict[str, np.ndarray],
        produced: dict[str, np.ndarray],
    ) -> Divergence | None:
        """Compare in topological order; a tensor matches when any counterpart matches."""
        for name, counterparts in items:
            if name not in produced:
                continue
            self.checked += 1
            comparisons = [
                compare_outputs(name, expected[c], produced[name], atol=self.atol, rtol=self.rtol)
                for c in counterparts
            ]
            match = next((i for i, c in enumerate(comparisons) if c.passed), None)
            if match is not None:
                self.passed_cand.add(name)
                self.passed_ref.add(counterparts[match])
                continue
            producer = self.cand.producer(name)
            return Divergence(
                tensor=name,
                node=producer.name,
                op_type=producer.op_type,
                comparison=comparisons[0],
                checked=self.checked,
                reference_tensor=counterparts[0],
                candidate_producer=producer,
                reference_producer=self.ref.producer(counterparts[0]),
                candidate_chain=self.cand.chain(name, self.passed_cand),
                reference_chain=self.ref.chain(counterparts[0], self.passed_ref),
            )
        return None
