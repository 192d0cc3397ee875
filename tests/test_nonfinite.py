"""A training step with a non-finite loss or gradient is skipped and counted; a run where they persist stops.

The NaN is a real one: a label out of range (10 for CIFAR-10's classes 0-9) makes that
example's cross-entropy NaN, while the gradients stay finite -- the case a check of the
gradients alone would miss.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cifar10 import steps, train
from experiments.cifar10.config import Config
from experiments.cifar10.errors import DivergedError

TINY = dict(batch_size=10, f_max_iter=4, b_max_iter=4)
MOCK_EXAMPLES = 30  # 3 training steps per epoch


def _labels_broken_at(broken_steps: set[int]):
    """A wrapper of ``epoch_batches`` that sets the first label of the given (1-based, whole-run) steps to 10."""
    real, seen = train.ip.epoch_batches, [0]

    def epoch_batches(*args, **kwargs):
        for images, labels in real(*args, **kwargs):
            if not kwargs.get("drop_remainder"):  # an evaluation's batches
                yield images, labels
                continue
            seen[0] += 1
            if seen[0] in broken_steps:
                labels = labels.copy()
                labels[0] = 10
            yield images, labels

    return epoch_batches


def test_a_non_finite_step_changes_nothing_and_the_next_one_trains():
    config = Config.for_model("chapter", **TINY)
    model_def, state, tx, _ = steps.init_state(config, total_steps=10)
    step = jax.jit(functools.partial(steps.train_step, model_def=model_def, tx=tx, config=config))
    images = jax.random.randint(jax.random.key(0), (10, 32, 32, 3), 0, 256).astype(jnp.uint8)
    good = jnp.arange(10, dtype=jnp.int32) % 10
    bad = good.at[3].set(10)

    after_bad, metrics = step(state, images, bad)
    assert float(metrics["skipped_steps"]) == 1 and float(metrics["count"]) == 0 and float(metrics["loss"]) == 0
    for part in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, after_bad[part], state[part])
    jax.tree.map(np.testing.assert_array_equal, after_bad["opt_state"].inner_state, state["opt_state"].inner_state)
    assert int(after_bad["opt_state"].notfinite_count) == 1

    after_good, metrics = step(after_bad, images, good)
    assert float(metrics["skipped_steps"]) == 0 and float(metrics["count"]) == 10
    assert int(after_good["opt_state"].notfinite_count) == 0
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), after_good["params"], state["params"])
    assert all(jax.tree.leaves(changed))


def test_a_transient_nan_is_skipped_and_counted_and_a_persistent_one_stops_the_run(mock_cifar10, monkeypatch, tmp_path):
    """Step 2 alone is non-finite (epoch 1 trains on), then all of epoch 2 (steps 4-6): the run stops there."""
    monkeypatch.setattr(train.ip, "epoch_batches", _labels_broken_at({2, 4, 5, 6}))
    config = Config.for_model("chapter", epochs=3, eval_limit=10, max_skipped_steps=3, **TINY)
    with mock_cifar10(MOCK_EXAMPLES), pytest.raises(DivergedError, match=r"steps 4-6 \(1-based\).*3 in a row"):
        train.train_and_evaluate(config, tmp_path)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_skipped_steps"] for m in history] == [1]
    assert np.isfinite(history[0]["train_loss"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_max_skipped_steps_is_checked():
    with pytest.raises(ValueError, match="--max-skipped-steps must be an int >= 1, got 0"):
        Config.for_model("chapter", max_skipped_steps=0)
