"""Hypothesis fuzzing of the public entry points (issue 18): Dense and activation
layers, Sequential construction / add / set_weights / compile / fit / predict /
evaluate / compute_gradients, save + load_model on mutated files, and the raw kernels,
on every backend. Each target runs in a subprocess (tests/_fuzz_worker.py), so a
segfault or an abort is reported as a failure naming the crashing input instead of
killing the test run. Examples are derandomized and bounded (the module takes well
under a minute).
"""
import os
import signal
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fuzz_worker.py")
#: Examples per target.
EXAMPLES = {"layers": 150, "model": 200, "structure": 150, "model_file": 200, "kernels": 150}
@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_fuzz(target):
    result = subprocess.run([sys.executable, WORKER, target, str(EXAMPLES[target])],
                            capture_output=True, text=True, timeout=600)
    lines = result.stderr.splitlines()
    inputs = [line for line in lines if line.startswith("INPUT ")]
    if result.returncode != 0:
        how = (f"died of {signal.Signals(-result.returncode).name}"
               if result.returncode < 0 else f"failed (exit status {result.returncode})")
        report = "\n".join(line for line in lines if not line.startswith("INPUT "))[-6000:]
        pytest.fail(f"fuzz target {target!r} {how} on the input\n"
                    f"{inputs[-1] if inputs else '(none)'}\n\n{report}", pytrace=False)
    assert len(inputs) >= EXAMPLES[target], f"only {len(inputs)} examples ran"
