"""The load test (`benchmarks/serve_load.py`) run small against a real `ldm serve` subprocess with the bundled
model: a burst of 4x the queue gets images or 429s and nothing hangs, memory stays within 5 % from 10 to 200
requests, interrupted and abandoned jobs free their slot within about a step. Its timings are printed, not judged."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def test_the_server_holds_under_load():
    run = subprocess.run([sys.executable, str(SCRIPT), "--steps", "4", "--pairs", "2", "--requests", "200",
                          "--max-queue", "2"], capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "0 checks failed" in run.stdout
