"""Names the user guide uses beyond the main classes: each exists and does what it says."""

import jax
import numpy as np
import pytest
from flax import nnx

from chainrule.models import (
    ConditionalPixelCNN,
    PixelCNNConfig,
    PrefixTunedTransformer,
    TransformerAutoregressiveModel,
    TransformerConfig,
    TransformerNetworkConfig,
)
from chainrule.models.base import PrefixParam
from chainrule.parallel import DeviceManager

NET = TransformerNetworkConfig(embed_dim=16, num_heads=2, dropout_rate=0.0)
CONFIG = TransformerConfig(vocab_size=11, sequence_length=16, num_layers=2, network=NET)


def test_device_manager_places_a_model_and_a_batch():
    manager = DeviceManager()
    device = manager.get_device()
    assert manager.platform == jax.default_backend() and device in jax.devices()
    model = jax.device_put(TransformerAutoregressiveModel(CONFIG, rngs=nnx.Rngs(0)), device)
    batch = jax.device_put(np.ones((2, 5), np.int32), device)
    assert model(batch)["logits"].shape == (2, 5, 11)
    with pytest.raises(ValueError, match="out of range"):
        manager.get_device(manager.num_devices)
    with pytest.raises(ValueError, match="platform='npu'"):
        DeviceManager("npu")


def test_prefix_tuned_transformer_adds_prefixes_to_every_layer():
    model = PrefixTunedTransformer(CONFIG, prefix_length=3, rngs=nnx.Rngs(0))
    prefixes = jax.tree.leaves(nnx.state(model, PrefixParam))
    assert len(prefixes) == 2 * CONFIG.num_layers and prefixes[0].shape == (3, 2, 8)
    x = np.arange(10, dtype=np.int32).reshape(2, 5)
    np.testing.assert_array_equal(model.forward_with_prefix(x)["logits"], model(x)["logits"])
    plain = TransformerAutoregressiveModel(CONFIG, rngs=nnx.Rngs(0))
    assert not np.allclose(plain(x)["logits"], model(x)["logits"])  # the prefix is attended to


def test_conditional_pixelcnn_uses_its_labels():
    config = PixelCNNConfig(image_shape=(4, 4, 1), num_levels=4, hidden_channels=8, num_layers=2,
                            num_residual_blocks=0, dropout_rate=0.0)
    model = ConditionalPixelCNN(config, num_classes=3, rngs=nnx.Rngs(0))
    assert model.num_classes == 3
    images = np.ones((2, 4, 4, 1), np.int32)
    a = model(images, class_labels=np.array([0, 0]))["logits"]
    b = model(images, class_labels=np.array([2, 2]))["logits"]
    assert not np.allclose(a, b)
    samples = model.generate_conditional(class_label=1, n_samples=2, rngs=nnx.Rngs(sample=0))
    assert samples.shape == (2, 4, 4, 1)


def test_generate_takes_conditioning_as_the_prompt_and_eval_mode():
    model = TransformerAutoregressiveModel(CONFIG, rngs=nnx.Rngs(0))
    model.eval()  # the guide calls it before generating
    prompt = np.array([[1, 2, 3]], np.int32)
    a = model.generate(1, max_length=8, temperature=0.0, prompt=prompt)
    b = model.generate(conditioning=prompt, n_samples=1, max_length=8, temperature=0.0)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        model.generate(1, prompt=prompt, conditioning=prompt)
