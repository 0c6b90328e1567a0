"""draw(): one entry point for every family. What it hands each model's generate / inpaint,
checked against calling the model directly with the same key; and the requests a model cannot
serve, refused before anything is generated. Tiny models only (every structure compiles)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from chainrule.models.pixelcnn import PixelCNN, PixelCNNConfig
from chainrule.models.wavenet import WaveNet, WaveNetConfig
from chainrule.sampling.config import SamplerConfig
from chainrule.sampling.draw import draw

SAMPLER = SamplerConfig(name="temperature", temperature=1.0, top_p=None, num_samples=3)
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def pixelcnn():
    config = PixelCNNConfig(image_shape=(4, 4, 1), num_levels=4, hidden_channels=6, num_layers=2,
                            num_residual_blocks=0, dropout_rate=0.0, num_classes=3)
    return PixelCNN(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def wavenet():
    config = WaveNetConfig(vocab_size=16, residual_channels=4, skip_channels=4, num_blocks=1,
                           layers_per_block=2, sequence_length=20, num_classes=2)
    return WaveNet(config, rngs=nnx.Rngs(0))


def test_pixelcnn_class_label_is_generate_conditional(pixelcnn):
    # sampler.max_length (debug=smoke sets it) does not apply to an image: it is ignored
    sampler = dataclasses.replace(SAMPLER, max_length=24)
    samples, _ = draw(pixelcnn, sampler, key=KEY, class_label=2)
    expected = pixelcnn.generate_conditional(2, n_samples=3, temperature=1.0,
                                             rngs=nnx.Rngs(sample=KEY))
    np.testing.assert_array_equal(np.stack(samples), expected)


def test_pixelcnn_inpainting_keeps_the_kept_pixels(pixelcnn):
    image = np.arange(16).reshape(4, 4, 1) % 4
    mask = np.zeros((4, 4), np.int32)
    mask[:2] = 1
    samples, _ = draw(pixelcnn, SAMPLER, key=KEY, inpaint=(image, mask), class_label=1)
    for sample in samples:
        np.testing.assert_array_equal(sample[:2], image[:2])
    expected = pixelcnn.inpaint(image, mask, n_samples=3, temperature=1.0,
                                rngs=nnx.Rngs(sample=KEY), class_labels=np.full(3, 1))
    np.testing.assert_array_equal(np.stack(samples), expected)


def test_wavenet_continues_a_prefix_in_a_class(wavenet):
    prefix = np.array([3, 9, 1, 15, 8], np.int32)
    sampler = dataclasses.replace(SAMPLER, max_new_tokens=7)
    samples, _ = draw(wavenet, sampler, key=KEY, prompts=[prefix], class_label=1)
    samples = np.stack(samples)
    assert samples.shape == (3, 5 + 7)  # max_new_tokens after the prefix
    np.testing.assert_array_equal(samples[:, :5], np.broadcast_to(prefix, (3, 5)))
    expected = wavenet.generate(n_samples=3, max_length=12, temperature=1.0, prefix=prefix,
                                global_condition=np.full(3, 1), rngs=nnx.Rngs(sample=KEY))
    np.testing.assert_array_equal(samples, expected)


@pytest.mark.parametrize("request_, match", [
    (dict(class_label=3), r"class_label=3 is out of range: this PixelCNN has 3 classes"),
    (dict(class_label=-1), r"class_label=-1 is out of range"),
    (dict(prompts=[np.array([1, 2])]), "continues no prompt"),
    (dict(sampler=dict(stop_tokens=[0])), r"sampler.stop_tokens=\[0\] is for token models"),
    (dict(sampler=dict(name="beam")), "sampler=beam is for token models"),
])
def test_pixelcnn_refuses_what_it_cannot_do(pixelcnn, request_, match):
    sampler = dataclasses.replace(SAMPLER, **request_.pop("sampler", {}))
    with pytest.raises(ValueError, match=match):
        draw(pixelcnn, sampler, key=KEY, **request_)


def test_unconditional_and_non_image_models_refuse_class_labels_and_masks(wavenet):
    unconditional = WaveNet(dataclasses.replace(wavenet.config, num_classes=None),
                            rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="class_label=0: this WaveNet is not class-conditional"):
        draw(unconditional, SAMPLER, key=KEY, class_label=0)
    with pytest.raises(ValueError, match="inpainting .* this model is a WaveNet"):
        draw(wavenet, SAMPLER, key=KEY, inpaint=(np.zeros((4, 4, 1)), np.ones((4, 4))))
    with pytest.raises(ValueError, match="sampler.repetition_penalty=1.3 is for token models"):
        draw(wavenet, dataclasses.replace(SAMPLER, repetition_penalty=1.3), key=KEY)
