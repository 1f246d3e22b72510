"""Bounded and cancellable verification (issue 12): a time budget and signals end ORT runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hanging_models import endless_loop

import bnfold
from bnfold import _ort
from bnfold.errors import BnfoldError, UsageError, VerificationTimeout

ROOT = Path(__file__).resolve().parent.parent
FEEDS = {"x": np.zeros(1, np.float32)}


@pytest.fixture(scope="module")
def session():
    return _ort.make_session(endless_loop().SerializeToString())


def test_budget_ends_a_2_to_the_62_loop(session):
    started = time.monotonic()
    with pytest.raises(VerificationTimeout, match="--verify-timeout") as info:
        with _ort.time_budget(0.5):
            _ort.run(session, FEEDS)
    assert time.monotonic() - started < 5
    assert (
        isinstance(info.value, BnfoldError) and info.value.exit_code == 4
    )  # unverified, not a bug (3)
    assert not isinstance(info.value, _ort.OrtRunError)
    assert not _ort._active  # nothing left registered


def test_env_var_is_the_budget_without_a_block(session, monkeypatch):
    monkeypatch.setenv("BNFOLD_VERIFY_TIMEOUT", "0.3")
    started = time.monotonic()
    with pytest.raises(VerificationTimeout, match="0.3 s"):
        _ort.run(session, FEEDS)
    assert time.monotonic() - started < 5


def test_verify_models_reports_a_timeout_as_unverified_not_a_mismatch(monkeypatch):
    monkeypatch.setenv("BNFOLD_VERIFY_TIMEOUT", "0.5")
    model = endless_loop()
    started = time.monotonic()
    result = bnfold.verify(model, model)
    assert time.monotonic() - started < 10
    assert not result and result.status == "unverified"
    assert "time budget of 0.5 s" in result.unverified_reason


def test_verify_models_timeout_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("BNFOLD_VERIFY_TIMEOUT", "600")
    model = endless_loop()
    result = bnfold.verify(model, model, timeout=0.4)
    assert result.status == "unverified" and "0.4 s" in result.unverified_reason


def test_resolve_verify_timeout(monkeypatch):
    monkeypatch.delenv("BNFOLD_VERIFY_TIMEOUT", raising=False)
    assert _ort.resolve_verify_timeout() == _ort.DEFAULT_VERIFY_TIMEOUT
    assert _ort.resolve_verify_timeout(12) == 12.0
    assert _ort.resolve_verify_timeout("none") is None
    assert _ort.resolve_verify_timeout(0) is None
    monkeypatch.setenv("BNFOLD_VERIFY_TIMEOUT", "2.5")
    assert _ort.resolve_verify_timeout() == 2.5
    assert _ort.resolve_verify_timeout(7) == 7.0  # the option wins over the environment
    monkeypatch.setenv("BNFOLD_VERIFY_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="BNFOLD_VERIFY_TIMEOUT"):
        _ort.resolve_verify_timeout()
    with pytest.raises(UsageError, match="--verify-timeout"):
        _ort.resolve_verify_timeout("-1")


def test_nested_budget_keeps_the_earlier_deadline(session):
    started = time.monotonic()
    with pytest.raises(VerificationTimeout):
        with _ort.time_budget(0.3):
            with _ort.time_budget(100):
                _ort.run(session, FEEDS)
    assert time.monotonic() - started < 5


def test_terminate_all_from_another_thread(session):
    timer = threading.Timer(0.3, _ort.terminate_all)
    timer.start()
    started = time.monotonic()
    with pytest.raises(_ort.Cancelled):
        with _ort.time_budget(60):
            _ort.run(session, FEEDS)
    timer.join()
    assert time.monotonic() - started < 5


def test_ordinary_runs_still_work():
    from deep_models import corner_tap_pair

    model, _ = corner_tap_pair()
    s = _ort.make_session(model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, 4, 3, 3)).astype(np.float32)
    with _ort.time_budget(60):
        (y,) = _ort.run(s, {"x": x})
    assert y.shape == (1, 4, 3, 3)


CHILD = textwrap.dedent(
    """
    import os, sys, tempfile, shutil
    sys.path.insert(0, {tests!r})
    from hanging_models import endless_loop
    import bnfold
    from bnfold import _ort
    staging = tempfile.mkdtemp(prefix="bnfold-staging-", dir={tmp!r})
    model = endless_loop()
    try:
        with _ort.cancel_on_signals():
            print("running", flush=True)
            bnfold.verify(model, model)
    except KeyboardInterrupt as exc:
        sys.exit(getattr(exc, "exit_code", 130))
    finally:
        shutil.rmtree(staging)
    sys.exit(0)
    """
)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_hanging_verification_exits_within_seconds(tmp_path, sig, code):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests"), tmp=str(tmp_path)))
    env = {**os.environ, "BNFOLD_VERIFY_TIMEOUT": "0"}  # no budget: only the signal can end it
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout.readline().strip() == b"running"
        time.sleep(1.0)  # well inside ORT's Loop by now
        assert child.poll() is None
        sent = time.monotonic()
        child.send_signal(sig)
        rc = child.wait(timeout=20)
        elapsed = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert rc == code, child.stderr.read().decode()[-2000:]
    assert elapsed < 5
    assert not list(tmp_path.glob("bnfold-staging-*"))  # cleanup ran
