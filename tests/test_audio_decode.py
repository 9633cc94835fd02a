"""Decoding audio files into the cache format: resampling, mixdown, length, int16, and a clear error per bad file."""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import hostile_files
from resnetlab.data import audio
from resnetlab.data.audio import decode_audio, default_duration, probe_audio, read_audio, resample
from resnetlab.data.errors import DataError


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def write(path: Path, data: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str | None = None) -> Path:
    sf.write(path, data, rate, subtype=subtype, format=fmt)
    return path


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spec)) * rate / len(x)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


# --- resampling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,freq", [(8000, 1000.0), (44100, 3000.0), (22050, 440.0), (48000, 7000.0),
                                       (11025, 2500.0), (16000, 1234.0)])
def test_decode_resamples_and_keeps_tone(tmp_path, rate, freq):
    path = write(tmp_path / "tone.wav", tone(freq, rate, 1.0), rate)
    x = decode_audio(path, 16000, 16000)
    assert x.dtype == np.int16 and x.shape == (16000,)
    assert abs(peak_hz(x, 16000) - freq) <= 1.0
    # Passband gain is 1: the amplitude survives (away from the clip edges, where the filter sees zeros).
    assert rms(x[1000:-1000] / 32768.0) == pytest.approx(0.5 / math.sqrt(2), rel=0.01)


@pytest.mark.parametrize("freq", [8100.0, 8500.0, 10000.0, 15000.0])
def test_downsampling_removes_tones_above_the_new_nyquist(tmp_path, freq):
    path = write(tmp_path / "high.wav", tone(freq, 44100, 1.0), 44100, subtype="FLOAT")
    x = decode_audio(path, 16000, 16000) / 32768.0
    assert rms(x[500:-500]) < 1e-4 * rms(tone(freq, 44100, 1.0))  # > 80 dB down: nothing aliases into the band


def _direct_resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """The definition, one output sample at a time: y[j] = sum_i x[i] h(j * orig / new - i)."""
    width = audio._half_width(orig, new)
    out = []
    for j in range(-(-x.numel() * new // orig)):
        pos = j * orig / new
        i = torch.arange(max(0, math.floor(pos) - width), min(x.numel(), math.floor(pos) + width + 2))
        out.append((x[i] * audio._sinc_kernel(pos - i.double(), orig, new)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("orig,new", [(441, 160), (1, 2), (3, 1), (11, 10), (9, 10)])
def test_polyphase_resampler_matches_the_direct_sum(orig, new):
    x = torch.randn(700, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = _direct_resample(x, orig, new)
    torch.testing.assert_close(resample(x, orig, new), expected, atol=1e-12, rtol=0)  # conv1d path
    np.testing.assert_allclose(resample(x.numpy(), orig, new), expected.numpy(), atol=1e-12, rtol=0)  # numpy path


def test_resample_lengths_and_batching():
    x = torch.randn(2, 3, 8001)
    y = resample(x, 8000, 16000)
    assert y.shape == (2, 3, 16002)
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 8000, 16000))
    assert resample(x, 16000, 16000) is x
    xn = x.numpy()
    yn = resample(xn, 8000, 16000)
    assert yn.shape == (2, 3, 16002) and yn.dtype == np.float32
    np.testing.assert_allclose(yn, y.numpy(), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="floating"):
        resample(np.zeros(10, np.int16), 8000, 16000)
    # Upsampling by 2 keeps the original samples (a band-limited interpolator passes through them).
    t = torch.from_numpy(tone(500.0, 8000, 0.5)).double()
    torch.testing.assert_close(resample(t, 8000, 16000)[200:-200:2], t[100:-100], atol=2e-4, rtol=0)


def test_int16_at_native_rate_is_exact(tmp_path):
    data = np.random.default_rng(0).integers(-32768, 32767, 16000, dtype=np.int16)
    path = write(tmp_path / "pcm.wav", data, 16000)
    np.testing.assert_array_equal(decode_audio(path, 16000, 16000), data)


def test_int16_conversion_clips():
    np.testing.assert_array_equal(audio.to_int16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)),
                                  np.array([-32768, -32768, 0, 16384, 32767, 32767], np.int16))


# --- channels and length ----------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [2, 3, 6])
def test_channels_are_mixed_down_by_their_mean(tmp_path, channels):
    rng = np.random.default_rng(channels)
    data = rng.integers(-8000, 8000, (4000, channels), dtype=np.int16)
    path = write(tmp_path / f"c{channels}.wav", data, 16000)
    x = decode_audio(path, 16000, 4000)
    expected = np.rint(data.astype(np.float64).mean(axis=1))
    assert np.abs(x - expected).max() <= 1


def test_stereo_tone_mix(tmp_path):
    left, right = tone(1000.0, 8000, 1.0, amp=0.6), tone(1000.0, 8000, 1.0, amp=0.2)
    path = write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), 8000)
    wave, rate = read_audio(path)
    assert rate == 8000 and wave.shape == (8000,)
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-4)


def test_short_clips_are_padded_symmetrically_and_long_ones_centre_cropped(tmp_path):
    data = np.arange(1, 1001, dtype=np.int16)
    path = write(tmp_path / "ramp.wav", data, 16000)
    padded = decode_audio(path, 16000, 1600)
    assert padded.shape == (1600,)
    assert not padded[:300].any() and not padded[1300:].any()
    np.testing.assert_array_equal(padded[300:1300], data)
    cropped = decode_audio(path, 16000, 601)
    np.testing.assert_array_equal(cropped, data[199:800])  # drops (1000 - 601) // 2 = 199 at the start


def test_ogg_vorbis_and_flac_decode(tmp_path):
    for name in ("tone.ogg", "tone.flac"):
        path = write(tmp_path / name, tone(700.0, 22050, 1.0), 22050, subtype="VORBIS" if name.endswith("ogg")
                     else "PCM_16")
        x = decode_audio(path, 16000, 16000)
        assert abs(peak_hz(x, 16000) - 700.0) <= 1.0


def test_all_silent_clip_is_valid(tmp_path):
    path = write(tmp_path / "silence.wav", np.zeros(8000, np.int16), 8000)
    x = decode_audio(path, 16000, 16000)
    assert x.shape == (16000,) and not x.any()


# --- bad files: one DataError each, naming the file -------------------------------------------------------

def _wav_bytes(channels: int = 1, n: int = 800) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, 16000, 32000 * max(channels, 1), 2 * max(channels, 1), 16)
    data = b"\x01\x00" * n * max(channels, 1)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _make_bad(kind: str, tmp: Path) -> tuple[Path, str]:
    """A bad file and a word its error message must contain."""
    good = _wav_bytes()
    if kind == "zero_byte":
        (p := tmp / "empty.wav").write_bytes(b"")
        return p, "empty"
    if kind == "truncated_header":
        (p := tmp / "cut_header.wav").write_bytes(good[:20])
        return p, "cannot decode"
    if kind == "truncated_data":
        (p := tmp / "cut_data.wav").write_bytes(good[:600])
        return p, "truncated"
    if kind == "random_bytes":
        (p := tmp / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4096))
        return p, "cannot decode"
    if kind == "text_flac":
        (p := tmp / "notes.flac").write_text("this is not a FLAC file\n" * 50)
        return p, "cannot decode"
    if kind == "truncated_flac":
        full = write(tmp / "full.flac", tone(440.0, 16000, 1.0), 16000).read_bytes()
        (p := tmp / "cut.flac").write_bytes(full[: len(full) // 2])
        return p, "cannot decode"
    if kind == "zero_length":
        return write(tmp / "nothing.wav", np.zeros((0,), np.int16), 16000), "zero-length"
    if kind == "zero_channels":
        (p := tmp / "nochan.wav").write_bytes(_wav_bytes(channels=0))
        return p, "channel"
    if kind == "nan_samples":
        return write(tmp / "nan.wav", np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT"), "NaN"
    if kind == "unsupported_extension":  # libsndfile reads MAT5, but .mat is left out (mostly MATLAB data)
        return write(tmp / "clip.mat", np.zeros(100, np.int16), 16000, fmt="MAT5"), "unsupported"
    if kind == "mat_named_wav":  # the content's container is checked, whatever the suffix
        return write(tmp / "mat.wav", np.zeros(100, np.int16), 16000, fmt="MAT5"), "unsupported"
    if kind == "missing":
        return tmp / "does_not_exist.wav", "cannot read"
    raise AssertionError(kind)


BAD_KINDS = ["zero_byte", "truncated_header", "truncated_data", "random_bytes", "text_flac", "truncated_flac",
             "zero_length", "zero_channels", "nan_samples", "unsupported_extension", "mat_named_wav", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_a_one_line_data_error_naming_the_file(tmp_path, kind):
    path, cause = _make_bad(kind, tmp_path)
    with pytest.raises(DataError) as info:
        decode_audio(path, 16000, 16000)
    message = str(info.value)
    assert str(path) in message
    assert cause.lower() in message.lower()
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_a_header_declaring_billions_of_frames_is_refused_before_reading(tmp_path):
    """A 40-byte damaged FLAC (found by the fuzzer) declares 8.6e9 frames: soundfile would allocate 32 GiB."""
    path = tmp_path / "bomb.flac"
    path.write_bytes(b'fLaC\x00\x00\x00"\x10\x00\x10\x00\x00\x02L\x00\x02L\x01\xf4\x00r\x00\x00\x03 \x87\xdc'
                     b'\xcc\xd1\xdd\xeet!+N\x80f\x15%\xbf\xe7')
    with pytest.raises(DataError, match="declares 8,589,935,392 frames") as info:
        decode_audio(path, 8000, 400)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_recording_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "MAX_AUDIO_VALUES", 1000)
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros((600, 2), dtype=np.float32), 8000)  # 1,200 samples
    with pytest.raises(DataError, match="more than 1,000 samples"):
        read_audio(path)
    sf.write(path, np.zeros((500, 2), dtype=np.float32), 8000)  # exactly the limit: read whole
    assert read_audio(path)[0].shape == (500,)


def test_a_header_that_overstates_the_length_costs_only_the_memory_of_what_is_there(tmp_path):
    """Before: soundfile allocated the declared 2**26 frames (256 MiB) for a 2 KB FLAC, then found it truncated."""
    import tracemalloc

    path = tmp_path / "liar.flac"
    path.write_bytes(hostile_files.flac(declared_frames=2**26))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated|cannot decode"):
            decode_audio(path, 8000, 400)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak:,} bytes"


@pytest.mark.timeout(30)  # before the fix the 600 MHz file never returned
@pytest.mark.parametrize("rate", [600_000_000, 768_001, 999, 1])
def test_a_sample_rate_outside_the_sane_range_is_refused_from_the_header(tmp_path, rate):
    """The issue's repro: 600 MHz spun the ratio search forever; 1 Hz asked for 16,000 samples per sample."""
    path = tmp_path / "forged.wav"
    path.write_bytes(hostile_files.wav(rate, frames=1000))
    with pytest.raises(DataError, match=f"sample rate of {rate:,} Hz, outside 1,000..768,000 Hz") as info:
        decode_audio(path, 16000, 16000)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    flac = tmp_path / "forged.flac"
    if rate < 2**20:  # FLAC's rate field has 20 bits
        flac.write_bytes(hostile_files.flac(declared_rate=rate))
        with pytest.raises(DataError, match="outside 1,000..768,000 Hz"):
            decode_audio(flac, 16000, 16000)


@pytest.mark.parametrize("rate", [1000, 768_000])
def test_the_ends_of_the_rate_range_still_decode(tmp_path, rate):
    path = tmp_path / "edge.wav"
    path.write_bytes(hostile_files.wav(rate, frames=rate // 10))
    assert decode_audio(path, 16000, 1600).shape == (1600,)


def test_a_resampled_length_past_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "MAX_RESAMPLED_VALUES", 10_000)
    path = write(tmp_path / "slow.wav", tone(100.0, 1000, 1.0), 1000)  # 1,000 frames -> 16,000 at 16 kHz
    read = []
    with monkeypatch.context() as m, pytest.raises(DataError, match="1,000 frames at 1,000 Hz resample to 16,000 "
                                                                    "samples at 16,000 Hz, more than 10,000") as info:
        m.setattr(sf.SoundFile, "read", lambda *a, **k: read.append(1))
        decode_audio(path, 16000, 16000)
    assert str(path) in str(info.value) and not read
    assert read_audio(path)[0].shape == (1000,)  # at its own rate it is fine


@pytest.mark.timeout(30)
@pytest.mark.parametrize("orig,new", [(600_000_000, 16000), (37_500, 1), (31_400, 1), (2**40 + 1, 3)])
def test_the_ratio_search_ends_for_any_ratio(orig, new):
    """Ratios whose filter cannot fit even as a whole number raise at once; before, the search looped forever."""
    with pytest.raises(ValueError, match="cannot resample by a ratio"):
        audio._fitting_ratio(Fraction(orig, new))
    with pytest.raises(ValueError, match="cannot resample"):
        resample(np.zeros(10, np.float32), orig, new)


@pytest.mark.parametrize("orig,new", [(44101, 16000), (31_000, 1), (768_000, 16000), (1000, 16000), (123457, 1000)])
def test_the_ratio_search_finds_a_fitting_kernel(orig, new):
    o, n = audio._fitting_ratio(Fraction(orig, new))
    assert audio._kernel_size(o, n) <= audio._MAX_POLYPHASE_KERNEL
    assert abs(o / n - orig / new) / (orig / new) < 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        decode_audio("x.wav", 16000, 0)
    with pytest.raises(ValueError, match="sample_rate"):
        decode_audio("x.wav", 16000.0, 100)


# --- probing ----------------------------------------------------------------------------------------------

def test_probe_reads_headers_and_skips_unreadable_files(tmp_path):
    paths = []
    for i, seconds in enumerate([0.4, 0.5, 0.6, 0.7, 2.0]):
        data = np.zeros((int(8000 * seconds), 2 if i == 0 else 1), np.int16)
        paths.append(write(tmp_path / f"{i}.wav", data, 8000 if i else 16000))
    (bad := tmp_path / "bad.wav").write_bytes(b"garbage")
    probe = probe_audio([*paths, bad])
    assert probe["sample_rate"] == 8000 and probe["channels"] == 1
    assert probe["duration_s"] == pytest.approx(0.6)
    assert probe["p95_duration_s"] == pytest.approx(np.percentile([0.2, 0.5, 0.6, 0.7, 2.0], 95))
    assert probe["min_duration_s"] == pytest.approx(0.2) and probe["max_duration_s"] == pytest.approx(2.0)
    assert probe["files_probed"] == 6 and probe["unreadable"] == 1
    assert probe_audio(paths, max_files=2)["files_probed"] == 2
    with pytest.raises(DataError, match="none of the 1"):
        probe_audio([bad])


@pytest.mark.parametrize("p95,expected", [(1.0, 1.0), (0.73, 0.8), (0.71, 0.8), (0.2, 0.5), (25.0, 10.0),
                                          (1.0000001, 1.0), (2.31, 2.4)])
def test_default_duration_rule(p95, expected):
    assert default_duration({"p95_duration_s": p95}) == pytest.approx(expected)


def test_probe_counts_a_forged_sample_rate_as_unreadable(tmp_path):
    paths = [write(tmp_path / f"ok{i}.wav", tone(440.0, 8000, 0.5), 8000) for i in range(2)]
    for i, rate in enumerate([600_000_000, 1]):
        (p := tmp_path / f"forged{i}.wav").write_bytes(hostile_files.wav(rate, frames=100))
        paths.append(p)
    probe = probe_audio(paths)
    assert probe["unreadable"] == 2 and probe["sample_rate"] == 8000 and probe["max_duration_s"] == 0.5
