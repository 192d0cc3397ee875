"""One device vs four (forced CPU devices, one process): the experiment's first training step agrees.

One subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=4``) compiles the
experiment's ``train_step`` on a 1-device and a 4-device mesh
(``experiments.benchmarks.device_parity.first_steps``: the shardings
``train.compile_steps`` uses, batch along 'data', state replicated), for the chapter's
settings, for the toolkit's (Broyden, phantom gradient, Jacobian penalty, weight
norm) and for MDEQ-tiny's (Broyden, weight norm, variational dropout 0.25: the masks,
drawn over the global batch, must not depend on how it is split), and takes one step
on the same batch of 8. The "optimizer" stores the gradient
as its state, so the gradient itself is compared, tensor by tensor.

Why float64 (``python -m experiments.benchmarks.device_parity``, 6 batches per row,
2026-12-03). In float32 the two meshes reduce in different orders (the gradient
all-reduce, BatchNorm's batch statistics), and most batches' gradients differ by
1e-5..5e-5 of a tensor's largest entry. But the cell has ReLUs: on one batch in six,
with the chapter's settings as with each toolkit option alone, a kernel gradient
differed by 8e-3..2.3e-2 -- a pre-activation within that noise of 0 whose mask the two
meshes round differently. With the ReLUs replaced by softplus no batch went above
1.7e-5. So a float32 gradient tolerance either fails by chance or is too loose to
test anything. In float64 every gap was <= 1.4e-13, so a tight tolerance catches a
logic error (a missing all-reduce, per-device BatchNorm statistics, a mis-sharded batch).

Tolerances (float64): gradients ``GRAD_RTOL = 1e-10`` of each tensor's largest entry
(measured here 1.2e-13 chapter, 1.7e-14 toolkit, 7.0e-15 MDEQ); losses and BatchNorm
statistics ``STATE_RTOL = 1e-10`` relative (measured: equal losses to 2e-16, statistics
4.7e-14, 4.2e-14 and 2.9e-16). Negative control: the 4-device step fed a batch whose second
device holds the first device's rows must be off by more than ``CONTROL_MIN_GAP = 1e-3``
(measured 0.99, 1.06 and 1.56). Conv biases that a train-mode BatchNorm follows (the chapter's stem, the MDEQ head's
downsampling and final convs) are left out: their true gradient is 0 and what is computed
is noise (the MDEQ head's final bias differed by 1.6 of its largest entry).

Cost: 6 compilations.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAD_RTOL = 1e-10
STATE_RTOL = 1e-10
CONTROL_MIN_GAP = 1e-3
SETTINGS = {
    "chapter": {},
    # jac_reg_freq=1.0: every step adds the penalty, so the test does not depend on how a
    # fraction of steps is chosen.
    "toolkit": dict(solver="broyden", gradient="phantom", phantom_steps=2, phantom_damping=0.8, jac_reg=0.5,
                    jac_reg_freq=1.0, norm="weight"),
    "mdeq": dict(model="mdeq-tiny", solver="broyden", dropout=0.25, norm="weight"),
}

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from experiments.benchmarks.device_parity import first_steps, gaps

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    wrong = images.copy()
    wrong[2:4] = images[0:2]  # the second device gets the first device's rows
    report = {}
    for name, settings in json.loads(sys.argv[1]).items():
        # The state goes to float64 (the images are normalised in float32, identically on both meshes).
        one, four = first_steps(settings, images, labels)
        (s1, m1), (s4, m4) = one(images, labels), four(images, labels)
        grads = gaps(s1["opt_state"], s4["opt_state"])
        worst = max(grads, key=grads.get)
        report[name] = {"loss": [float(m1["loss"]), float(m4["loss"])], "worst": [worst, grads[worst]],
                        "stats": max(gaps(s1["batch_stats"], s4["batch_stats"]).values()),
                        "control": max(gaps(s1["opt_state"], four(wrong, labels)[0]["opt_state"]).values())}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
    """Every setting in one subprocess (6 compilations; it shares the run's compilation cache, see conftest)."""
    # Added to the run's XLA_FLAGS, not in their place: the subprocess compiles as every test does (see conftest).
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(SETTINGS)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_four_devices_match_one_device_in_float64(report, settings):
    got = report[settings]
    print(settings, got)  # the measured gaps, with -s
    (loss1, loss4), (tensor, gap) = got["loss"], got["worst"]
    assert abs(loss4 - loss1) <= STATE_RTOL * abs(loss1), got
    assert gap <= GRAD_RTOL, f"{settings}: {tensor}'s gradient is {gap:.2e} of its largest entry apart ({got})"
    assert got["stats"] <= STATE_RTOL, got
    # The comparison can fail: feeding the wrong rows on one device moves the gradient far beyond it.
    assert got["control"] > CONTROL_MIN_GAP, got
