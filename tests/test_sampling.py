"""Logit processors: exact semantics of temperature, top-k, top-p, repetition penalty."""

import jax
import jax.numpy as jnp
import numpy as np

from chainrule.sampling import (
    process_logits,
    repetition_penalty,
    sample_token,
    top_k_filter,
    top_p_filter,
)


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.5, 2.0]])
    for k in range(1, 7):
        kept = np.isfinite(np.asarray(top_k_filter(logits, k)))
        assert kept.sum() == k
    kept = np.isfinite(np.asarray(top_k_filter(logits, 2)))[0]
    assert kept[[1, 2]].all()  # the two best (ties broken by index)
    assert np.isfinite(np.asarray(top_k_filter(logits, 0))).all()  # 0 = off


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.05, 0.4, 0.3, 0.15, 0.1])
    logits = jnp.log(jnp.asarray(probs))[None]
    for p, expected in [(0.35, {1}), (0.4, {1}), (0.41, {1, 2}), (0.7, {1, 2}),
                        (0.71, {1, 2, 3}), (0.96, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        kept = set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p)[0]))))
        assert kept == expected, (p, kept)


def test_top_p_zero_keeps_the_most_likely_token():
    """Audit finding: top_p=0.0 kept nothing, and sampling then drew token 0 forever."""
    logits = jax.random.normal(jax.random.key(3), (16, 30))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.0)))
    assert (kept.sum(-1) == 1).all() and (kept.argmax(-1) == np.asarray(logits.argmax(-1))).all()
    draws = sample_token(jax.random.key(5), logits, temperature=1.0, top_p=0.0)
    assert (draws == logits.argmax(-1)).all()


def test_temperature_zero_is_greedy_and_low_temperature_approaches_it():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (64, 50))
    greedy = jnp.argmax(logits, -1)
    assert (sample_token(key, logits, temperature=0.0) == greedy).all()
    assert (sample_token(jax.random.key(1), logits, temperature=1e-4) == greedy).all()


def test_sampling_frequencies_follow_filtered_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (20000, 4))
    draws = np.asarray(sample_token(jax.random.key(3), logits, temperature=1.0, top_k=2))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
    draws = np.asarray(sample_token(jax.random.key(4), logits, temperature=1.0, top_p=0.9))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)


def test_processors_compose_in_order():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    out = process_logits(logits, temperature=2.0, top_k=3, top_p=None)
    np.testing.assert_allclose(np.asarray(out)[0, :3], [1.0, 0.5, 0.0])
    assert np.isneginf(np.asarray(out)[0, 3])


def test_repetition_penalty():
    logits = jnp.array([[2.0, -1.0, 0.5, 1.0]])
    out = np.asarray(repetition_penalty(logits, jnp.array([[0, 1]]), 2.0))
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 1.0]])
    assert np.allclose(repetition_penalty(logits, jnp.array([[0, 1]]), 1.0), logits)


def test_knobs_are_traced_not_static():
    fn = jax.jit(lambda key, lg, t, k, p: sample_token(key, lg, temperature=t, top_k=k, top_p=p))
    logits = jax.random.normal(jax.random.key(0), (4, 10))
    for t, k, p in [(1.0, 1, 0.9), (0.5, 3, 1.0), (0.0, 0, 0.5)]:
        fn(jax.random.key(0), logits, t, k, p)
    assert fn._cache_size() == 1  # one compilation serves every setting


def test_fused_processing_equals_the_filters_in_sequence():
    from chainrule.sampling import temperature_scale

    logits = jax.random.normal(jax.random.key(5), (6, 40)) * 3
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 12, 0.6), (1.0, 1, 0.1)]:
        expected = top_p_filter(top_k_filter(temperature_scale(logits, t), k), p)
        np.testing.assert_array_equal(np.asarray(process_logits(logits, temperature=t, top_k=k,
                                                                top_p=p)), np.asarray(expected))
        # Told in advance (static) whether a filter may be on: the same values. With `filters`
        # False no filter applies, which is only allowed when both are off.
        for filters in (True, False) if (k, p) == (0, 1.0) else (True,):
            np.testing.assert_array_equal(
                np.asarray(process_logits(logits, temperature=t, top_k=k, top_p=p,
                                          filters=filters)), np.asarray(expected))


def test_generate_with_top_p_zero_is_greedy():
    """The audit's case through the Python API: a Transformer's generate(top_p=0.0)."""
    from flax import nnx

    from chainrule.models import (
        TransformerAutoregressiveModel,
        TransformerConfig,
        TransformerNetworkConfig,
    )

    config = TransformerConfig(vocab_size=40, sequence_length=16, num_layers=1,
                               network=TransformerNetworkConfig(embed_dim=16, num_heads=2))
    model = TransformerAutoregressiveModel(config, rngs=nnx.Rngs(params=0))
    nucleus = model.generate(2, max_length=12, temperature=1.0, top_p=0.0, rngs=nnx.Rngs(sample=1))
    greedy_ = model.generate(2, max_length=12, temperature=0.0, rngs=nnx.Rngs(sample=1))
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy_))
    assert len(set(np.asarray(nucleus)[:, 1:].ravel().tolist())) > 1  # not token 0 forever
