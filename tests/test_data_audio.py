"""Audio data: μ-law, WAV reading and resampling, the synthetic / wav_folder / fsdd pipelines."""

import math
import wave
from pathlib import Path

import numpy as np
import pytest

from chainrule.data import build_data
from chainrule.data.audio import (
    AudioDataConfig,
    mu_law_decode,
    mu_law_encode,
    read_audio,
    read_wav,
    resample,
)

# ----------------------------------------------------------------------------- μ-law


@pytest.mark.parametrize("mu", [255, 15])
def test_mu_law_round_trip_within_the_quantisation_bound(mu):
    x = np.linspace(-1, 1, 20001)
    codes = mu_law_encode(x, mu)
    assert codes.dtype == np.int32 and codes.min() == 0 and codes.max() == mu
    assert np.all(np.diff(codes) >= 0)  # monotone
    error = np.abs(mu_law_decode(codes, mu) - x)
    # Codes are y = sign(x) ln(1 + mu|x|) / ln(1 + mu) rounded to a grid of step 2 / mu, so
    # |y - y_hat| <= 1 / mu, and x = ((1 + mu)^|y| - 1) / mu turns that into this bound:
    bound = (1 + mu * np.abs(x)) * ((1 + mu) ** (1 / mu) - 1) / mu + 1e-6
    assert np.all(error <= bound)
    assert (error / bound).max() > 0.4  # the bound is tight, not vacuous
    assert mu_law_encode(np.zeros(1), mu)[0] == (mu + 1) // 2  # silence: the middle code


def test_mu_law_bad_input():
    with pytest.raises(ValueError, match="sample 1.5 is outside"):
        mu_law_encode(np.array([0.0, 1.5]))
    with pytest.raises(ValueError, match="float waveform"):
        mu_law_encode(np.array([0, 1]))
    with pytest.raises(ValueError, match="mu=0"):
        mu_law_encode(np.zeros(3), 0)
    with pytest.raises(ValueError, match="code 256 is outside"):
        mu_law_decode(np.array([256]))


# ----------------------------------------------------------------------------- WAV files


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """samples: int [frames] or [frames, channels], already in the width's integer range."""
    samples = np.asarray(samples)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    if width == 1:
        raw = (samples + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = samples.astype("<i4").reshape(-1, 1).view(np.uint8)[:, :3].tobytes()
    else:
        raw = samples.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return path


def sine(freq, rate, seconds, amplitude=0.5):
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_pcm_widths(tmp_path, width):
    full = 2 ** (8 * width - 1)
    ints = np.array([-full, -full // 2, 0, full // 4, full - 1])
    x, rate = read_wav(write_wav(tmp_path / "a.wav", ints, 8000, width))
    assert rate == 8000 and x.dtype == np.float32
    np.testing.assert_allclose(x, ints / full, atol=1e-7)


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = np.array([1000, -2000, 300]), np.array([3000, 0, -300])
    x, _ = read_wav(write_wav(tmp_path / "s.wav", np.stack([left, right], 1), 8000))
    np.testing.assert_allclose(x, (left + right) / 2 / 32768)


def test_other_rates_are_resampled(tmp_path):
    x = read_audio(write_wav(tmp_path / "r.wav", np.round(sine(440, 22050, 0.5) * 32767), 22050),
                   8000)
    assert len(x) == 4000
    spectrum = np.abs(np.fft.rfft(x[500:3500] * np.hanning(3000)))
    assert abs(np.argmax(spectrum) * 8000 / 3000 - 440) < 3  # the tone keeps its pitch
    np.testing.assert_allclose(np.abs(x[500:3500]).max(), 0.5, atol=0.01)  # and its level


def test_resample_removes_aliases():
    # A 6 kHz tone is above the 4 kHz Nyquist of 8 kHz audio: it must be filtered, not aliased.
    assert np.abs(resample(sine(6000, 16000, 0.5), 16000, 8000)[100:-100]).max() < 0.01
    # A 1 kHz tone passes unchanged.
    np.testing.assert_allclose(resample(sine(1000, 16000, 0.5), 16000, 8000)[100:-100],
                               sine(1000, 8000, 0.5)[100:-100], atol=2e-3)


def test_resample_matches_scipy():
    signal = pytest.importorskip("scipy.signal")  # the reference, not a dependency
    x = np.random.default_rng(0).normal(size=2000)
    for orig, target in [(44100, 8000), (8000, 16000), (16000, 8000), (11025, 8000)]:
        np.testing.assert_allclose(resample(x, orig, target),
                                   signal.resample_poly(x, target, orig), atol=1e-5)


@pytest.mark.parametrize("content, match", [
    (b"this is not audio", "not a readable WAV file"),
    (b"", "not a readable WAV file"),
])
def test_bad_wav_files(tmp_path, content, match):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        read_wav(path)
    assert "bad.wav" in str(info.value)


def test_wav_without_samples_and_float_wav(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        read_wav(write_wav(tmp_path / "empty.wav", np.zeros(0), 8000))
    # IEEE float WAV (format tag 3): not PCM.
    data = np.zeros(4, "<f4").tobytes()
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little") \
        + (32000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" \
        + len(data).to_bytes(4, "little") + data
    path = tmp_path / "float.wav"
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    with pytest.raises(ValueError, match="float.wav: not a readable WAV file.*PCM"):
        read_wav(path)


# ----------------------------------------------------------------------------- pipelines


def check_bundle(bundle, config, *, labelled: bool):
    batch = next(bundle.train)
    window = config.sequence_length + 1
    assert batch["waveform"].shape == (config.batch_size, window)
    assert batch["waveform"].dtype == np.int32
    assert 0 <= batch["waveform"].min() and batch["waveform"].max() <= config.mu
    assert ("labels" in batch) == labelled
    if labelled:
        assert batch["labels"].shape == (config.batch_size,) and batch["labels"].dtype == np.int32
        assert 0 <= batch["labels"].min() and batch["labels"].max() < bundle.info["num_classes"]
    assert len(bundle.val_batches) == config.val_batches
    assert bundle.val_batches[0]["waveform"].shape == (config.batch_size, window)
    assert bundle.codec.model_fields()["vocab_size"] == config.mu + 1
    assert bundle.codec.kind == "audio" and bundle.info["sample_rate"] == config.sample_rate
    audio = bundle.codec.decode(batch["waveform"][0])
    assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
    return batch


def test_synthetic_source():
    config = AudioDataConfig(sequence_length=500, batch_size=4, val_batches=2, label_from="pitch")
    bundle = build_data(config)
    check_bundle(bundle, config, labelled=True)
    assert bundle.info["label_names"][0] == "C" and bundle.codec.model_fields()["num_classes"] == 12
    # Not silence: real tones (the μ-law codes spread well beyond the middle).
    assert np.std(bundle.val_batches[0]["waveform"]) > 10
    unlabelled = AudioDataConfig(sequence_length=100, batch_size=2)
    bundle = build_data(unlabelled)
    check_bundle(bundle, unlabelled, labelled=False)
    assert bundle.codec.model_fields() == {"vocab_size": 256}


def test_train_iterator_is_seeded_and_checkpointable():
    config = AudioDataConfig(sequence_length=200, batch_size=4, seed=3)
    first = build_data(config)
    for _ in range(3):
        next(first.train)
    state = first.train.get_state()
    expected = [next(first.train)["waveform"] for _ in range(2)]

    resumed = build_data(config)
    resumed.train.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed.train)["waveform"], want)
    other_seed = build_data(AudioDataConfig(sequence_length=200, batch_size=4, seed=4))
    assert not np.array_equal(next(other_seed.train)["waveform"],
                              next(build_data(config).train)["waveform"])
    # Validation batches do not depend on the seed.
    np.testing.assert_array_equal(other_seed.val_batches[0]["waveform"],
                                  first.val_batches[0]["waveform"])


def make_folder(root: Path) -> Path:
    """FSDD-style names; mixed widths, channels and rates; one clip shorter than a crop."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for digit in range(3):
        for index in range(4):
            rate = (8000, 16000, 11025)[index % 3]
            x = np.round(sine(200 + 100 * digit, rate, 0.3 if index else 0.01) * 32767)
            width, data = 2, x
            if index == 1:
                width, data = 1, np.round(x / 256)
            if index == 2:
                data = np.stack([x, x * 0.5 + rng.normal(0, 100, len(x))], 1).round()
            write_wav(root / f"{digit}_alice_{index}.wav", data, rate, width)
    return root


def test_wav_folder_source(tmp_path):
    folder = make_folder(tmp_path / "clips")
    config = AudioDataConfig(source="wav_folder", path=str(folder), sequence_length=800,
                             batch_size=4, label_from="digit")
    bundle = build_data(config)
    check_bundle(bundle, config, labelled=True)
    assert bundle.info["label_names"] == ["0", "1", "2"]
    # 12 files whose CRC buckets leave the test split empty: every clip is cut 80/10/10.
    assert [bundle.info[f"{s}_clips"] for s in ("train", "val", "test")] == [12, 12, 12]
    # The 0.01 s clips (80 samples at 8 kHz) are padded with μ-law silence.
    crops = np.concatenate([next(bundle.train)["waveform"] for _ in range(12)])
    assert np.any(np.all(crops[:, 100:] == bundle.info["silence_code"], axis=1))
    # Labels by regex and by parent folder.
    regex = build_data(AudioDataConfig(source="wav_folder", path=str(folder), sequence_length=50,
                                       batch_size=2, label_from=r"_(\d)$"))
    assert regex.info["label_names"] == ["0", "1", "2", "3"]  # the take index


def test_wav_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a folder of .wav files"):
        AudioDataConfig(source="wav_folder")
    with pytest.raises(ValueError, match="is not a folder"):
        build_data(AudioDataConfig(source="wav_folder", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .wav files"):
        build_data(AudioDataConfig(source="wav_folder", path=str(tmp_path / "empty")))
    bad = tmp_path / "bad"
    bad.mkdir()
    write_wav(bad / "good.wav", np.zeros(100), 8000)
    (bad / "notes.wav").write_text("hello")
    with pytest.raises(ValueError, match="notes.wav: not a readable WAV file"):
        build_data(AudioDataConfig(source="wav_folder", path=str(bad)))
    with pytest.raises(ValueError, match="no label"):
        build_data(AudioDataConfig(source="wav_folder", path=str(bad), label_from=r"(\d+)"))


@pytest.mark.parametrize("bad, match", [
    (dict(source="mp3"), "data.source='mp3' is unknown"),
    (dict(mu=70000), r"mu=70000: expected an integer in \[1, 65535\]"),
    (dict(sequence_length=0), "data.sequence_length=0: expected a positive integer"),
    (dict(label_from="digit"), "synthetic clips are labelled by pitch class"),
    (dict(source="fsdd", label_from="(a)(b)"), "exactly one group"),
    (dict(source="fsdd", label_from="(unclosed"), "not a keyword"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        AudioDataConfig(**bad)


def test_fsdd_official_split(shared_data):
    if not (shared_data / "fsdd" / "recordings").is_dir():
        pytest.skip("FSDD is not in ../shared/data")
    config = AudioDataConfig(source="fsdd", path=str(shared_data / "fsdd" / "recordings"),
                             label_from="digit", batch_size=8, val_batches=2)
    bundle = build_data(config)
    check_bundle(bundle, config, labelled=True)
    counts = tuple(bundle.info[f"{s}_clips"] for s in ("train", "val", "test"))
    assert counts == (2400, 300, 300)  # takes 10-49 / 5-9 / 0-4 (the official test)
    assert bundle.info["label_names"] == [str(d) for d in range(10)]
    assert bundle.codec.model_fields() == {"vocab_size": 256, "num_classes": 10}
    assert math.isclose(sum(bundle.info[f"{s}_seconds"] for s in ("train", "val", "test")),
                        21.9 * 60, rel_tol=0.01)  # SOURCE.txt: 21.9 minutes in all
