"""Gated PixelCNN: causality (receptive field by gradients), fast == naive sampling, inpainting,
conditioning, the loss against a reference, learning, and input checks. Tiny models only."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainrule.models.pixelcnn import PixelCNN, PixelCNNConfig


def tiny(**overrides) -> PixelCNNConfig:
    fields = dict(image_shape=(6, 6, 1), num_levels=4, hidden_channels=8, num_layers=3,
                  num_residual_blocks=1, dropout_rate=0.0)
    fields.update(overrides)
    return PixelCNNConfig(**fields)


@pytest.fixture(scope="module")
def grey():
    return PixelCNN(tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def colour():
    """RGB with class conditioning: the channel masks and the embedding in one model."""
    return PixelCNN(tiny(image_shape=(4, 5, 3), num_levels=5, num_classes=3), rngs=nnx.Rngs(1))


def random_images(model, n, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, model.num_levels, (n, *model.image_shape)), jnp.int32)


# Compiled once per model shape: eager op-by-op execution compiles every op separately.
@nnx.jit
def evaluate(model, images, labels=None):
    """(logits, losses) in evaluation mode."""
    outputs = model(images, class_labels=labels)
    return outputs["logits"], model.loss_fn({"images": images}, outputs)


def forward(model, images, labels=None):
    return evaluate(model, images, labels)[0]


def losses_of(model, images):
    return evaluate(model, images)[1]


@nnx.jit
def input_jacobian(model, x, labels):
    """|d (random projection of the logits at each sub-pixel) / d input|, summed over the
    batch: [H, W, C] outputs x [H, W, C] inputs."""
    w = jax.random.normal(jax.random.key(4), (model.num_levels,))

    def projected(x):
        return (model.logits_from_scaled(x, class_labels=labels) @ w).sum(0)

    return jnp.abs(jax.jacrev(projected)(x)).sum(3)


def jacobian(model, labels=None):
    return np.asarray(input_jacobian(model, model.scale(random_images(model, 2, seed=3)), labels))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value", [
    ("image_shape", (28, 28)), ("image_shape", (0, 28, 1)), ("num_levels", 1),
    ("hidden_channels", 2), ("num_layers", 0), ("num_residual_blocks", -1),
    ("kernel_size", 4), ("kernel_size", 1), ("dropout_rate", 1.0), ("num_classes", 0)])
def test_config_rejects_bad_values(field, value):
    kwargs = {"image_shape": (8, 8, 3), field: value}
    with pytest.raises(ValueError, match=field):
        PixelCNNConfig(**kwargs)


def test_keyword_form_equals_config_form():
    x = jnp.zeros((1, 6, 6, 1), jnp.int32)
    by_keywords = PixelCNN(image_shape=(6, 6, 1), num_layers=2, hidden_channels=8,
                           num_residual_blocks=1, rngs=nnx.Rngs(5))
    by_config = PixelCNN(PixelCNNConfig(image_shape=(6, 6, 1), num_layers=2, hidden_channels=8,
                                        num_residual_blocks=1), rngs=nnx.Rngs(5))
    assert by_keywords.config == by_config.config
    np.testing.assert_array_equal(forward(by_keywords, x), forward(by_config, x))
    with pytest.raises(ValueError, match="num_heads"):
        PixelCNN(num_heads=4, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- causality


def test_receptive_field_is_the_causal_past_with_no_blind_spot(grey):
    reach = grey.config.receptive_field  # 3 layers x (3 // 2) = 3
    r, c = 4, 2
    grad = jacobian(grey)[r, c, 0, :, :, 0]
    rows, cols = np.indices(grad.shape)
    future = (rows > r) | ((rows == r) & (cols >= c))
    assert np.all(grad[future] == 0), "a logit depends on its own pixel or a later one"
    # The whole cone above (and to the right: no blind spot) and the row to the left are seen.
    cone = (((rows >= r - reach) & (rows < r) & (abs(cols - c) <= reach))
            | ((rows == r) & (cols < c) & (cols >= c - reach)))
    assert np.all(grad[cone] > 0), np.argwhere(cone & (grad == 0))
    assert grad[r - 1, c + 1] > 0 and grad[r - 1, c + reach] > 0 and grad[r - reach, c] > 0
    assert grad[r - 1, c + 2] > 0  # the blind spot of the original (ungated) PixelCNN
    # ...and nothing beyond the vertical reach.
    assert np.all(grad[: r - reach] == 0)


def test_colour_channels_follow_r_g_b_order(colour):
    r, c = 2, 2
    jac = jacobian(colour, jnp.array([0, 2]))
    for ch in range(3):
        grad = jac[r, c, ch]
        rows, cols = np.indices(grad.shape[:2])
        later = (rows > r) | ((rows == r) & (cols > c))
        assert np.all(grad[later] == 0)
        assert np.all(grad[r, c, ch:] == 0), f"channel {ch} sees itself or a later channel"
        assert np.all(grad[r, c, :ch] > 0), f"channel {ch} misses an earlier channel"
        assert np.all(grad[r - 1, c + 1] > 0) and np.all(grad[r, c - 1] > 0)


# ----------------------------------------------------------------------------- loss


def test_loss_matches_a_hand_computed_reference(grey):
    images = random_images(grey, 2)
    losses = losses_of(grey, images)
    logits = np.asarray(forward(grey, images), np.float64)
    target = np.asarray(images)
    nll, correct = [], []
    for idx in np.ndindex(target.shape):
        row = logits[idx]
        log_z = math.log(sum(math.exp(v) for v in row))
        nll.append(log_z - row[target[idx]])
        correct.append(int(np.argmax(row)) == target[idx])
    assert logits.shape == (2, 6, 6, 1, 4)
    np.testing.assert_allclose(losses["nll_loss"], np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(losses["loss"], np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(losses["bits_per_dim"], np.mean(nll) / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(losses["accuracy"], np.mean(correct), rtol=1e-6)


def test_uniform_model_has_log2_levels_bits_per_dim():
    model = PixelCNN(tiny(image_shape=(8, 8, 1), num_levels=17), rngs=nnx.Rngs(0))
    model.head.out.kernel[...] = jnp.zeros_like(model.head.out.kernel[...])
    model.head.out.bias[...] = jnp.zeros_like(model.head.out.bias[...])
    images = random_images(model, 3)
    losses = losses_of(model, images)
    np.testing.assert_allclose(losses["bits_per_dim"], math.log2(17), rtol=1e-6)
    np.testing.assert_allclose(losses["nll_loss"], math.log(17), rtol=1e-6)


def test_class_label_changes_the_logits(colour):
    images = jnp.broadcast_to(random_images(colour, 1), (2, 4, 5, 3))
    a = forward(colour, images, jnp.array([0, 1]))
    b = forward(colour, images, jnp.array([0, 2]))
    np.testing.assert_array_equal(a[0], b[0])
    assert np.all(np.abs(np.asarray(a[1] - b[1])).sum(-1) > 0)  # at every sub-pixel
    assert colour.model_kwargs({"images": images, "labels": jnp.array([1, 2])}).keys() == {
        "class_labels"}


def test_training_applies_dropout():
    # one gated layer and no residual block: one dropout site, a quick compile
    model = PixelCNN(tiny(num_layers=1, num_residual_blocks=0, dropout_rate=0.5),
                     rngs=nnx.Rngs(0))
    batch = {"images": random_images(model, 2), "labels": jnp.array([0, 1])}
    loss = nnx.jit(lambda m, b, rngs, training: m.train_loss(b, rngs=rngs, training=training)
                   ["loss"], static_argnums=3)
    a = loss(model, batch, nnx.Rngs(dropout=1), True)
    b = loss(model, batch, nnx.Rngs(dropout=2), True)
    assert a != b  # different dropout masks
    assert a != loss(model, batch, None, False)  # and none in evaluation
    with pytest.raises(ValueError, match="rngs"):
        model.train_loss(batch)
    assert model.model_kwargs(batch) == {}  # unconditional: labels stay out


def test_overfitting_one_batch_of_digits_lowers_the_loss():
    from sklearn.datasets import load_digits

    images = jnp.asarray(load_digits().images[:16, :, :, None].astype(np.int32))
    model = PixelCNN(tiny(image_shape=(8, 8, 1), num_levels=17), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: m.train_loss({"images": images}, training=False)["loss"])(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[0] > 2.0  # about log(17) = 2.83 at initialisation
    assert losses[-1] < 0.6 * losses[0], losses


# ----------------------------------------------------------------------------- generation


# Generation compiles once per (model, n_samples, filters on/off): the tests share n_samples.
def test_fast_generation_equals_naive_grey(grey):
    fast = grey.generate(n_samples=3, rngs=nnx.Rngs(sample=7))
    naive = grey.generate_naive(n_samples=3, rngs=nnx.Rngs(sample=7))
    assert fast.shape == (3, 6, 6, 1) and fast.dtype == jnp.int32
    np.testing.assert_array_equal(fast, naive)
    assert int(fast.min()) >= 0 and int(fast.max()) < 4
    assert len(np.unique(np.asarray(fast))) > 1
    other = grey.generate(n_samples=3, rngs=nnx.Rngs(sample=8))
    assert not np.array_equal(fast, other)


def test_fast_generation_equals_naive_colour_conditional(colour):
    labels = jnp.array([2, 0])
    fast = colour.generate(n_samples=2, temperature=0.8, rngs=nnx.Rngs(sample=3),
                           class_labels=labels)
    naive = colour.generate_naive(n_samples=2, temperature=0.8, rngs=nnx.Rngs(sample=3),
                                  class_labels=labels)
    np.testing.assert_array_equal(fast, naive)
    # Without labels a conditional model draws classes 0, 1, 2, ... in turn.
    np.testing.assert_array_equal(
        colour.generate(n_samples=2, rngs=nnx.Rngs(sample=4)),
        colour.generate(n_samples=2, rngs=nnx.Rngs(sample=4), class_labels=jnp.array([0, 1])))


def test_greedy_generation_and_the_filters(grey):
    a = grey.generate(n_samples=3, temperature=0.0, rngs=nnx.Rngs(sample=1))
    b = grey.generate(n_samples=3, temperature=0.0, rngs=nnx.Rngs(sample=2))
    np.testing.assert_array_equal(a, b)  # greedy ignores the key
    # top_k=1 or a tiny top_p leaves only the most likely level: greedy at any temperature
    for knobs in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)):  # one compile
        np.testing.assert_array_equal(
            grey.generate(n_samples=3, temperature=1.5, rngs=nnx.Rngs(sample=3), **knobs), a)
    wide = grey.generate(n_samples=3, temperature=1.5, top_k=4, top_p=1.0, rngs=nnx.Rngs(3))
    assert not np.array_equal(wide, a)  # all 4 levels allowed: no longer greedy


def test_generate_conditional(colour):
    samples = colour.generate_conditional(1, n_samples=2, rngs=nnx.Rngs(sample=5))
    np.testing.assert_array_equal(
        samples, colour.generate(n_samples=2, rngs=nnx.Rngs(sample=5),
                                 class_labels=jnp.array([1, 1])))
    with pytest.raises(ValueError, match="class_label"):
        colour.generate_conditional(3, n_samples=2)


def test_inpainting_keeps_the_kept_pixels_and_matches_naive(grey):
    conditioning = random_images(grey, 1, seed=9)[0]
    mask = jnp.zeros((6, 6)).at[:3].set(1).at[4, 2:5].set(1)  # top half and a stripe below
    out = grey.inpaint(conditioning, mask, n_samples=3, rngs=nnx.Rngs(sample=2))
    kept = np.asarray(mask, bool)
    assert out.shape == (3, 6, 6, 1)
    for sample in np.asarray(out):
        np.testing.assert_array_equal(sample[kept], np.asarray(conditioning)[kept])
    assert len({np.asarray(s)[~kept].tobytes() for s in out}) > 1  # the rest is drawn
    naive = grey.generate_naive(n_samples=3, rngs=nnx.Rngs(sample=2), conditioning=conditioning,
                                mask=mask)
    np.testing.assert_array_equal(out, naive)


# ----------------------------------------------------------------------------- input checks


def test_bad_inputs_raise_clear_errors(grey, colour):
    with pytest.raises(ValueError, match=r"expected integer levels in \[0, num_levels"):
        grey(jnp.zeros((1, 6, 6, 1), jnp.float32))
    with pytest.raises(ValueError, match=r"\(1, 6, 5, 1\).*\(6, 6, 1\)"):
        grey(jnp.zeros((1, 6, 5, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"span \[4, 4\].*num_levels=4"):
        grey(jnp.full((1, 6, 6, 1), 4, jnp.int32))
    with pytest.raises(ValueError, match=r"span \[-1, -1\]"):
        grey(jnp.full((1, 6, 6, 1), -1, jnp.int32))
    with pytest.raises(ValueError, match="unconditional"):
        grey(jnp.zeros((1, 6, 6, 1), jnp.int32), class_labels=jnp.array([0]))
    with pytest.raises(ValueError, match="class-conditional"):
        colour(jnp.zeros((1, 4, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match="class_labels span"):
        colour(jnp.zeros((1, 4, 5, 3), jnp.int32), class_labels=jnp.array([3]))
    with pytest.raises(ValueError, match="n_samples"):
        grey.generate(n_samples=0)
    with pytest.raises(ValueError, match="temperature"):
        grey.generate(n_samples=1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        grey.generate(n_samples=1, top_p=0.0)
    with pytest.raises(ValueError, match="mask has shape"):
        grey.inpaint(jnp.zeros((6, 6, 1), jnp.int32), jnp.ones((5, 6)))
    with pytest.raises(ValueError, match="0 or 1"):
        grey.inpaint(jnp.zeros((6, 6, 1), jnp.int32), jnp.full((6, 6), 2))
    with pytest.raises(ValueError, match="num_classes"):
        grey.generate_conditional(0)
