"""Model- and file-controlled text is inert in every renderer (issue 15, injection).

Node names, paths and error text are crafted to hold terminal escapes (CSI screen clear, OSC 8
hyperlink, OSC title), rich markup (``[link=...]``, a fake green ``PASSED``, ``[/]``), Markdown/HTML
(``|``, newlines, ``<img>``, links) and a GitHub Actions workflow command. Each must come out as
literal, visible text: no escape byte reaches the output, rich interprets no markup (and never
crashes on it), a Markdown table row stays one row, and no log line starts with ``::``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import onnx
import pytest
from helpers import write_unfoldable_model
from rich.console import Console
from typer.testing import CliRunner

from bnfold.batch import BatchItem, BatchResult, CheckResult
from bnfold.cli import app
from bnfold.compare import OutputComparison, VerificationResult
from bnfold.divergence import Divergence, LocalizeResult, Producer
from bnfold.latency import bench
from bnfold.render.console import (
    batch_progress_line,
    make_console,
    render,
    render_batch,
    render_check,
    render_localize,
    render_verification,
)
from bnfold.render.markdown import (
    batch_markdown,
    check_markdown,
    fold_markdown,
    verification_markdown,
)
from bnfold.render.text import inert, md_inert
from bnfold.report import BNDecision, FoldReport, SkipReason

CSI_CLEAR = "\x1b[2J\x1b[H"
OSC8_LINK = "\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07"
OSC_TITLE = "\x1b]0;pwned\x07"
RICH_LINK = "[link=http://x]here[/link]"
FAKE_PASSED = "[green]PASSED[/]"
CLOSE_TAG = "[/]"
MD_LINK = "[md](http://x.example)"
IMG = "<img src=x>"
WORKFLOW = "x\n::error title=t::m\n.onnx"
CRAFTED = " ".join(
    [
        CSI_CLEAR,
        OSC8_LINK,
        OSC_TITLE,
        RICH_LINK,
        FAKE_PASSED,
        CLOSE_TAG,
        "a|b",
        "l1\nl2",
        IMG,
        MD_LINK,
    ]
)

runner = CliRunner()


def plain_console() -> tuple[Console, io.StringIO]:
    """A console writing to a string, as on a CI log (not a terminal)."""
    out = io.StringIO()
    return Console(file=out, highlight=False, width=80), out


def terminal_console() -> tuple[Console, io.StringIO]:
    """A console that believes it draws on a colour terminal (styles are ANSI codes)."""
    out = io.StringIO()
    return Console(file=out, force_terminal=True, color_system="truecolor", width=200), out


def assert_inert_console_output(text: str) -> None:
    for sequence in ("\x1b[2J", "\x1b]8;", "\x1b]0;", "\x07"):
        assert sequence not in text, f"{sequence!r} reached the output"
    assert not any(line.startswith("::") for line in text.splitlines())


def assert_no_raw_escape(text: str) -> None:
    """Not a terminal: nothing may carry an ESC byte at all."""
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert_inert_console_output(text)


def crafted_report() -> FoldReport:
    return FoldReport(
        decisions=[
            BNDecision(
                CRAFTED,
                folded=False,
                detail=f"input comes from Relu <{CRAFTED}>",
                reason=SkipReason.UNSUPPORTED_PRODUCER,
            ),
            BNDecision(
                "bn2" + CLOSE_TAG,
                folded=True,
                detail="folded",
                direction="forward",
                target=CRAFTED,
                target_op="Conv",
            ),
        ],
        input=f"models/{WORKFLOW}",
        output=f"out/{CLOSE_TAG}{OSC_TITLE}.onnx",
        written=True,
        nodes_before=4,
        nodes_after=3,
    )


def crafted_verification() -> VerificationResult:
    common = dict(
        dtype="float32",
        shape=(2, 2),
        atol=1e-4,
        rtol=1e-4,
        max_abs_error=1.0,
        mean_abs_error=0.25,
        median_abs_error=0.0,
        max_rel_error=1.0,
        worst_index=(0, 1),
        mismatched=1,
        nan_or_inf_mismatch=0,
        min_atol_to_pass=1.0,
        min_rtol_to_pass=1.0,
        passed=False,
        elements=4,
    )
    outputs = (
        OutputComparison(name=CRAFTED, message=f"ORT said: {CRAFTED}", **common),
        OutputComparison(name=f"y {CLOSE_TAG}{CSI_CLEAR}", **common),  # the "would pass with" line
    )
    return VerificationResult(passed=False, outputs=outputs, message=f"candidate: {CRAFTED}")


# --- the helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("\x1b]0;t\x07", "\\x1b]0;t\\x07"),
        ("a\nb\r\tc", "a\\nb\\r\\tc"),
        ("\x9b31m\x7f\x00", "\\x9b31m\\x7f\\x00"),
        ("abc\u202edcba", "abc\\u202edcba"),
        ("conv1.weight [3x3] ü", "conv1.weight [3x3] ü"),
    ],
)
def test_inert_shows_control_characters_as_visible_escapes(raw, shown):
    assert inert(raw) == shown


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a|b", "a\\|b"),
        ("<img src=x>", "&lt;img src=x&gt;"),
        ("[md](http://x)", "\\[md\\](http://x)"),
        ("`code` *b* _i_ ~s~", "\\`code\\` \\*b\\* \\_i\\_ \\~s\\~"),
        ("l1\nl2", "l1\\\\nl2"),
        ("a & b", "a &amp; b"),
    ],
)
def test_md_inert_escapes_markdown_and_html(raw, shown):
    assert md_inert(raw) == shown


def test_md_inert_escapes_block_starts_only_at_a_line_start():
    assert md_inert("# title", line_start=True) == "\\# title"
    assert md_inert("1. item", line_start=True) == "1\\. item"
    assert md_inert("- item", line_start=True) == "\\- item"
    assert md_inert("1.2.3") == "1.2.3"


# --- console ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [plain_console, terminal_console])
def test_fold_report_renders_crafted_names_literally(make):
    console, out = make()
    render(crafted_report(), console, verbose=True)  # "[/]" used to raise rich's MarkupError
    text = out.getvalue()
    assert_inert_console_output(text)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the terminal's own colours
    assert "\x1b" not in plain
    for literal in (FAKE_PASSED, RICH_LINK, CLOSE_TAG, "\\x1b[2J", "\\x1b]0;pwned\\x07"):
        assert literal in plain
    assert "models/x\\n::error title=t::m\\n.onnx" in plain


def test_terminal_output_holds_no_hyperlink_from_a_name():
    console, out = terminal_console()
    report = FoldReport(
        decisions=[
            BNDecision(RICH_LINK, folded=False, detail=OSC8_LINK, reason=SkipReason.OVERFLOW)
        ],
        nodes_before=1,
        nodes_after=1,
    )
    render(report, console)
    # rich turns [link=...] into an OSC 8 hyperlink; a name must never do that.
    assert "\x1b]8" not in out.getvalue()
    assert RICH_LINK in re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())


def test_a_fake_passed_is_not_green():
    console, out = terminal_console()
    report = FoldReport(
        decisions=[BNDecision(FAKE_PASSED, folded=False, detail="d", reason=SkipReason.OVERFLOW)],
        nodes_before=1,
        nodes_after=1,
    )
    render(report, console)
    row = next(line for line in out.getvalue().splitlines() if "PASSED" in line and "[" in line)
    assert "[green]PASSED[/]" in re.sub(r"\x1b\[[0-9;]*m", "", row)


def test_verification_renders_crafted_output_names_and_messages_literally():
    console, out = plain_console()
    render_verification(crafted_verification(), console, title=f"{WORKFLOW} vs {CLOSE_TAG}")
    text = out.getvalue()
    assert_no_raw_escape(text)
    assert FAKE_PASSED in text and "ORT said:" in text


def test_localize_renders_crafted_tensor_and_node_names_literally():
    comparison = crafted_verification().outputs[1]
    node = Producer(f"conv {CRAFTED}", "Conv")
    divergence = Divergence(
        tensor=f"t {CRAFTED}",
        node=node.name,
        op_type="Conv",
        comparison=comparison,
        checked=3,
        reference_tensor=f"r {CLOSE_TAG}",
        candidate_producer=node,
        reference_producer=node,
        candidate_chain=(node, Producer(WORKFLOW, "Relu")),
    )
    console, out = terminal_console()
    render_localize(LocalizeResult(divergence, checked=3, shared=5), console)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())
    assert_inert_console_output(out.getvalue())
    assert "\x1b" not in plain and FAKE_PASSED in plain and RICH_LINK in plain


def test_batch_summary_and_progress_lines_cannot_start_a_workflow_command():
    items = [
        BatchItem(WORKFLOW, None, 2, error=f"cannot load {CRAFTED}"),
        BatchItem(
            f"models/{CLOSE_TAG}.onnx",
            "out.onnx",
            0,
            report={**crafted_report().to_dict(), "exit_code": 0},
        ),
    ]
    console, out = plain_console()
    render_batch(BatchResult(items=items, seconds=1.0, jobs=1), console)
    text = out.getvalue()
    assert_no_raw_escape(text)
    assert "x\\n::error title=t::m\\n.onnx" in text
    for done, item in enumerate(items, start=1):
        line = batch_progress_line(item, done, len(items))
        assert "\n" not in line and "\x1b" not in line and not line.startswith("::")


def test_check_renders_crafted_paths_and_names_literally():
    results = [
        CheckResult(
            path=f"{WORKFLOW}{CLOSE_TAG}",
            batchnorms=1,
            foldable=[{"name": CRAFTED, "target": CRAFTED, "target_op": "Conv", "detail": IMG}],
            verification=crafted_verification(),
            exit_code=1,
        ),
        CheckResult(path=OSC8_LINK, error=f"bad model: {CRAFTED}", exit_code=2),
    ]
    console, out = plain_console()
    render_check(results, console)
    assert_no_raw_escape(out.getvalue())
    assert RICH_LINK in out.getvalue()


def test_non_terminal_output_is_unwrapped_and_unpadded():
    long_name = "encoder/" + "very_long_block_name_" * 8 + "BatchNormalization"
    report = FoldReport(
        decisions=[BNDecision(long_name, folded=False, detail="d", reason=SkipReason.OVERFLOW)],
        nodes_before=1,
        nodes_after=1,
    )
    out = io.StringIO()
    console = make_console()  # stdout is not a terminal under pytest
    console.file = out
    render(report, console)
    lines = out.getvalue().splitlines()
    assert any(long_name in line for line in lines), "the name was wrapped"
    assert all(line == line.rstrip() for line in lines), "lines are padded with spaces"


# --- Markdown --------------------------------------------------------------------------------------


def assert_inert_markdown(text: str, columns: dict[str, int]) -> None:
    """No escape bytes, HTML, links or code spans; every table row has its header's cell count."""
    assert "\x1b" not in text and "\x07" not in text
    assert "<img" not in text, "raw HTML"
    assert not re.search(r"(?<!\\)\]\(", text), "an unescaped Markdown link"
    assert not re.search(r"(?<!\\)`", text), "an unescaped code span"
    assert not any(line.startswith("::") for line in text.splitlines())
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line)) - 1
        if header is None:
            header = cells
        assert cells == header, f"row with {cells} cells under a {header}-cell header: {line!r}"
    assert columns  # the caller names the tables it expects
    for title, n in columns.items():
        assert any(
            line.startswith(f"| {title} ") and line.count("|") == n + 1
            for line in text.splitlines()
        )


def test_fold_markdown_keeps_rows_intact():
    text = fold_markdown([crafted_report()])
    assert_inert_markdown(text, {"model": 7})
    assert "&lt;img src=x&gt;" in text and "a\\|b" in text


def test_batch_markdown_keeps_rows_intact():
    items = [BatchItem(WORKFLOW, None, 2, error=f"cannot load {CRAFTED}")]
    text = batch_markdown(BatchResult(items=items, seconds=1.0, jobs=1))
    assert_inert_markdown(text, {"model": 7})


def test_check_and_verification_markdown_keep_rows_intact():
    results = [
        CheckResult(
            path=WORKFLOW,
            batchnorms=1,
            foldable=[{"name": CRAFTED, "target": CRAFTED, "target_op": "Conv", "detail": IMG}],
            exit_code=1,
        ),
        CheckResult(path=MD_LINK, error=f"bad: {CRAFTED}", exit_code=2),
    ]
    assert_inert_markdown(check_markdown(results), {"model": 7})
    text = verification_markdown(crafted_verification(), WORKFLOW, f"`{MD_LINK}`")
    assert_inert_markdown(text, {"output": 7})


# --- through the command line ----------------------------------------------------------------------


@pytest.fixture
def crafted_model(tmp_path):
    """X → Conv → Relu → BatchNormalization → Relu → Y, every node named with crafted text."""
    path = tmp_path / "crafted.onnx"
    write_unfoldable_model(path)
    model = onnx.load(str(path))
    for k, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}{k} {CRAFTED}"
    onnx.save(model, str(path))
    return path


def test_fold_cli_with_crafted_node_names(crafted_model, tmp_path):
    md = tmp_path / "fold.md"
    result = runner.invoke(
        app, ["fold", str(crafted_model), "-o", str(tmp_path / "out.onnx"), "--markdown", str(md)]
    )
    assert result.exit_code == 0, result.output  # "[/]" in a name used to crash with exit 3
    assert_no_raw_escape(result.output)
    assert FAKE_PASSED in result.output and CLOSE_TAG in result.output
    assert_inert_markdown(md.read_text(), {"model": 7})


def test_batch_cli_with_a_workflow_command_in_a_file_name(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    write_unfoldable_model(models / WORKFLOW)
    write_unfoldable_model(models / "plain.onnx")
    result = runner.invoke(app, ["fold", str(models), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert_no_raw_escape(result.output)
    assert not any(line.startswith("::") for line in result.output.splitlines())


# --- logs ------------------------------------------------------------------------------------------


def test_log_lines_hold_no_control_characters_from_model_labels(caplog):
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "cnn1d.onnx"
    labels = [WORKFLOW, f"b{CSI_CLEAR}{OSC_TITLE}"]
    with caplog.at_level("INFO", logger="bnfold"):
        bench([sample, sample], labels=labels, levels="disable", runs=2, warmup=0, sessions=1)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bnfold")]
    assert any("x\\n::error" in m for m in messages)
    for message in messages:
        assert "\n" not in message and "\x1b" not in message and "\x07" not in message
