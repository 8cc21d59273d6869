"""The parity tests cannot pass silently without the reference: with
``TGATE_KERNELS_REQUIRE_REFERENCE=1`` (the README's test command) a missing ``tgate`` fails them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.parametrize("required, outcome", [("1", "1 error"), ("0", "1 skipped")])
def test_a_missing_reference_fails_when_required(tmp_path, required, outcome):
    shadow = tmp_path / "tgate"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the reference is hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               TGATE_KERNELS_REQUIRE_REFERENCE=required, OMP_NUM_THREADS="1")
    test = f"{TESTS / 'test_schedule.py'}::test_plans_match_the_reference_scheduler_exhaustively[0]"
    done = subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider", "-rs"],
                          capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=300)
    assert outcome in done.stdout, done.stdout[-3000:]
    assert "the reference `tgate==1.0.0` is not installed" in done.stdout
