"""Checkpointer: round trips, retention, damage fallback, nnx state, read_meta."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainrule.checkpoint import Checkpointer, Restored, read_meta


def _state(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "params": {"w": jax.random.normal(k1, (4, 3)), "b": jnp.arange(3, dtype=jnp.bfloat16)},
        "rng": jax.random.key_data(k2),
        "count": jnp.asarray(7, jnp.int32),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def _assert_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                      np.asarray(y).reshape(-1).view(np.uint8))


def test_round_trip_state_data_meta_metrics(tmp_path: Path) -> None:
    state = _state()
    data_state = {"next_index": 12, "parents": [{"epoch": 1}]}
    meta = {"wandb_run_id": "abc123", "model_family": "transformer", "config": {"d": 8}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(5, state, data_state=data_state, meta=meta, metrics={"val_loss": 1.5})
        restored = ckpt.restore(_abstract(state))
    assert isinstance(restored, Restored) and restored.step == 5
    _assert_bitwise_equal(restored.state, state)
    assert restored.data_state == data_state
    assert restored.meta == meta
    assert restored.metrics == {"val_loss": 1.5}
    # Concrete arrays work as the target too, and a second manager sees the same step.
    again = Checkpointer(tmp_path / "ckpt").restore(state, step=5)
    _assert_bitwise_equal(again.state, state)


def test_optional_items_restore_as_none(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state())
    restored = ckpt.restore(_abstract(_state()))
    assert restored.data_state is None and restored.meta is None and restored.metrics is None
    assert read_meta(tmp_path) is None


def test_keep_last_plus_best(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_best=1)
    state = _state()
    for step, loss in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0], strict=True):
        assert ckpt.save(step, state, metrics={"val_loss": loss})
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
    ckpt.close()
    # Retention state comes back from disk: a new manager prunes with the saved metrics.
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_best=1)
    assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
    ckpt.save(6, state, metrics={"val_loss": 0.5})
    assert ckpt.all_steps() == [5, 6] and ckpt.best_step() == 6


def test_best_mode_max(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric="acc", best_mode="max")
    for step, acc in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0], strict=True):
        ckpt.save(step, _state(), metrics={"acc": acc})
    assert ckpt.all_steps() == [1, 4, 5] and ckpt.best_step() == 1


def test_steps_without_the_metric_are_pruned_not_kept(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_best=1)
    ckpt.save(1, _state(), metrics={"val_loss": 3.0})
    for step in range(2, 6):  # no metrics, other metrics, a NaN: none of them can be "best"
        metrics = [None, {"train_loss": 0.1}, {"val_loss": float("nan")}, None][step - 2]
        ckpt.save(step, _state(), metrics=metrics)
    assert ckpt.all_steps() == [1, 4, 5]
    assert ckpt.best_step() == 1


def test_save_skips_old_steps_unless_new(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    assert ckpt.save(np.int64(3), _state())
    assert not ckpt.save(2, _state())
    assert ckpt.all_steps() == [3]


def test_damaged_latest_falls_back_with_warning(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=3)
    states = {step: _state(step) for step in (1, 2, 3)}
    for step, state in states.items():
        ckpt.save(step, state, data_state={"i": step}, meta={"step": step})
    (tmp_path / "3" / "state" / "manifest.ocdbt").unlink()  # simulate a lost file

    with pytest.warns(UserWarning, match=r"step 3 .*damaged"):
        restored = ckpt.restore(_abstract(states[3]))
    assert restored.step == 2 and restored.data_state == {"i": 2}
    _assert_bitwise_equal(restored.state, states[2])
    assert ckpt.damaged_steps == {3}
    # An explicit step gives the error itself instead of falling back.
    with pytest.raises(ValueError):
        ckpt.restore(_abstract(states[3]), step=3)

    # The resumed run saves step 3 again: the damaged copy is replaced, not skipped.
    with pytest.warns(UserWarning, match="deleting damaged checkpoint step 3"):
        assert ckpt.save(3, states[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ckpt.restore(_abstract(states[3]))
    assert again.step == 3
    _assert_bitwise_equal(again.state, states[1])


def test_truncated_file_and_all_damaged(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(), meta={"a": 1})
    ckpt.save(2, _state(), meta={"a": 2})
    meta_file = tmp_path / "2" / "meta" / "metadata"
    meta_file.write_bytes(meta_file.read_bytes()[:5])  # truncated JSON
    with pytest.warns(UserWarning, match="step 2"):
        assert ckpt.restore(_abstract(_state())).step == 1
    with pytest.warns(UserWarning, match="step 2"):
        assert read_meta(tmp_path) == {"a": 1}
    (tmp_path / "1" / "state" / "manifest.ocdbt").unlink()
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"steps \[2, 1\]"):
        ckpt.restore(_abstract(_state()))


def test_unfinished_tmp_directory_is_ignored(tmp_path: Path) -> None:
    Checkpointer(tmp_path).save(1, _state(), meta={"ok": True})
    # What a save killed before its commit-rename leaves behind.
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "junk").write_bytes(b"\0" * 16)
    assert read_meta(tmp_path) == {"ok": True}
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert ckpt.restore(_abstract(_state())).step == 1
    ckpt.save(2, _state())
    assert ckpt.all_steps() == [1, 2]


def test_empty_directory(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "new")
    assert ckpt.latest_step() is None and ckpt.best_step() is None and ckpt.all_steps() == []
    assert ckpt.restore(_abstract(_state())) is None
    with pytest.raises(ValueError, match="no checkpoint for step 4"):
        ckpt.restore(_abstract(_state()), step=4)
    assert read_meta(tmp_path / "new") is None
    assert read_meta(tmp_path / "missing") is None


def test_read_meta_newest(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(10, _state(), meta={"model_family": "pixelcnn", "config": {"model": {"n": 2}}})
    ckpt.save(20, _state(), meta={"model_family": "wavenet", "config": {}})
    assert read_meta(tmp_path) == {"model_family": "wavenet", "config": {}}


def test_async_save(tmp_path: Path) -> None:
    state = _state(3)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state, data_state={"i": 1})
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        _assert_bitwise_equal(ckpt.restore(_abstract(state)).state, state)


@pytest.mark.parametrize("kwargs, match", [
    ({"keep_last": 0}, "keep_last"),
    ({"keep_best": -1}, "keep_best"),
    ({"best_mode": "avg"}, "best_mode"),
    ({"best_metric": ""}, "best_metric"),
])
def test_bad_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path, **kwargs)


def test_bad_save_arguments(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    for bad_step in (-1, 2.0, True):
        with pytest.raises(ValueError, match="step must be"):
            ckpt.save(bad_step, _state())
    with pytest.raises(ValueError, match="data_state must be JSON"):
        ckpt.save(1, _state(), data_state={"x": object()})
    with pytest.raises(ValueError, match="metric 'val_loss'"):
        ckpt.save(1, _state(), metrics={"val_loss": "low"})
    assert ckpt.all_steps() == []


def test_nnx_model_and_optimizer_round_trip(tmp_path: Path) -> None:
    def build(seed: int):
        model = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    model, optimizer = build(0)
    x = jnp.ones((4, 3))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    saved = nnx.state((model, optimizer))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, saved)

        # A fresh model with different init, restored through its abstract state.
        fresh_model, fresh_optimizer = build(1)
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
            nnx.state((fresh_model, fresh_optimizer)))
        restored = ckpt.restore(abstract)
    nnx.update((fresh_model, fresh_optimizer), restored.state)

    _assert_bitwise_equal(nnx.state((fresh_model, fresh_optimizer)), saved)
    assert int(fresh_optimizer.step[...]) == 1
    np.testing.assert_array_equal(fresh_model(x), model(x))


_SHARDED_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from chainrule.checkpoint import Checkpointer

assert jax.device_count() == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
w = jnp.arange(8.0).reshape(4, 2)
state = {"w": jax.device_put(w, replicated), "v": jax.device_put(jnp.arange(6.0), split)}
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, state)
# Restore with the layouts swapped: each array must land with the sharding asked for.
abstract = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=split),
            "v": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=replicated)}
out = ckpt.restore(abstract).state
assert out["w"].sharding == split and out["v"].sharding == replicated, out
np.testing.assert_array_equal(out["w"], w)
np.testing.assert_array_equal(out["v"], np.arange(6.0))
assert [s.data.shape for s in out["w"].addressable_shards] == [(2, 2), (2, 2)]
print("SHARDED-OK")
"""


def test_restore_places_arrays_with_requested_shardings(tmp_path: Path) -> None:
    # A fresh interpreter: the device count is fixed when JAX starts.
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path / "ck")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "SHARDED-OK" in result.stdout, result.stderr[-3000:]


def test_a_damaged_best_step_falls_back_to_the_newest_readable(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=3, keep_best=1)
    states = {step: _state(step) for step in (1, 2, 3)}
    for step, loss in ((1, 2.0), (2, 1.0), (3, 3.0)):
        ckpt.save(step, states[step], metrics={"val_loss": loss})
    assert ckpt.best_step() == 2
    _assert_bitwise_equal(ckpt.restore_best(_abstract(states[2])).state, states[2])
    (tmp_path / "2" / "state" / "manifest.ocdbt").unlink()
    with pytest.warns(UserWarning, match=r"step 2 .*damaged.*newest readable step"):
        restored = ckpt.restore_best(_abstract(states[2]))
    assert restored.step == 3
    _assert_bitwise_equal(restored.state, states[3])
    assert Checkpointer(tmp_path / "empty").restore_best(_abstract(states[1])) is None
