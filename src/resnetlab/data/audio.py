"""Audio files -> fixed-length int16 waves at one sample rate: what the cache stores for speech datasets.

WAV, FLAC, OGG (Vorbis/Opus), MP3 and the other containers the installed libsndfile lists
(``AUDIO_EXTENSIONS``) are read with soundfile. Every clip is mixed down to mono,
resampled to the target rate with a band-limited windowed-sinc resampler (:func:`resample`, also used on the
device by speed perturbation), centred in a window of ``num_samples`` (centre crop or symmetric zero padding)
and stored as int16. Bad files raise :class:`~resnetlab.data.errors.DataError` with a one-line message that
names the file and the cause.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from resnetlab.data.errors import DataError

# File suffix -> the libsndfile container (``soundfile.available_formats()``) that reads it. Left out: RAW (no
# header: rate and encoding would be guesses), MAT4/MAT5 (``.mat`` is mostly MATLAB data) and MPC2K (``.mpc`` is
# usually Musepack, which libsndfile cannot read).
_SUFFIX_CONTAINERS = {
    ".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG", ".mp3": "MP3",
    ".aif": "AIFF", ".aiff": "AIFF", ".aifc": "AIFF", ".au": "AU", ".snd": "AU", ".caf": "CAF", ".w64": "W64",
    ".rf64": "RF64", ".voc": "VOC", ".sph": "NIST", ".nist": "NIST", ".8svx": "SVX", ".16svx": "SVX",
    ".paf": "PAF", ".pvf": "PVF", ".sd2": "SD2", ".sds": "SDS", ".htk": "HTK", ".avr": "AVR", ".wve": "WVE",
    ".xi": "XI", ".ircam": "IRCAM",
}
# What the installed libsndfile reads (MP3 since libsndfile 1.1): the audio suffixes of datasets and predict
# (data/layout.py's AUDIO_EXTS) and the containers a file's content may be, whatever its suffix (checked on the
# content, so a file libsndfile would only read as RAW is still refused).
AUDIO_EXTENSIONS = tuple(e for e, c in _SUFFIX_CONTAINERS.items() if c in sf.available_formats())
_CONTAINERS = {c for c in _SUFFIX_CONTAINERS.values() if c in sf.available_formats()} | {"WAVEX"}
# Their names for messages: "WAV, FLAC, OGG, MP3, ..."
AUDIO_FORMAT_NAMES = ", ".join(dict.fromkeys(_SUFFIX_CONTAINERS[e] for e in AUDIO_EXTENSIONS))
# Data-chunk sizes that streaming writers put in a WAV header when they do not know the length yet.
_STREAMING_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}
_TRUNCATED_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)

INT16_SCALE = 32768.0  # int16 <-> float: x_float = x_int16 / 32768, the convention of soundfile and PyTorch

# Resampler quality: Kaiser-windowed sinc, 64 zero crossings each side, cutoff at 96% of the lower Nyquist
# frequency, beta 8.6. Measured 48 kHz (or 44.1 kHz) -> 16 kHz: flat within 0.1 dB to 7.4 kHz (-0.4 dB at 7.5 kHz,
# -2.4 dB at 7.6 kHz), and every tone above 8.05 kHz, which would alias, is attenuated by more than 89 dB.
# torchaudio's default (6 crossings, rolloff 0.99) aliases far more; its "kaiser_best" (64, 0.948, beta 14.8)
# trades passband for a stopband deeper than int16 can use.
LOWPASS_WIDTH = 64
ROLLOFF = 0.96
KAISER_BETA = 8.6
_MAX_POLYPHASE_KERNEL = 1 << 22  # taps; odd rate pairs (44101 -> 16000) get a close ratio that fits, see resample()


def decoder_versions() -> dict[str, str | int]:
    """What decides the samples a file decodes to, for the cache key: ``DECODER_VERSION`` and the versions of the
    libraries that decode and resample (soundfile and its libsndfile; numpy and torch compute the resampler)."""
    return {"audio": DECODER_VERSION, "soundfile": sf.__version__, "libsndfile": sf.__libsndfile_version__,
            "numpy": np.__version__, "torch": torch.__version__}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_extension(path: Path) -> None:
    ext = path.suffix.lower()
    if ext not in AUDIO_EXTENSIONS:
        shown = repr(ext) if ext else "(no extension)"
        raise DataError(f"{path}: unsupported audio format {shown}; supported: {AUDIO_FORMAT_NAMES} "
                        f"({', '.join(AUDIO_EXTENSIONS)})")


MAX_AUDIO_VALUES = 2**27  # samples (frames x channels) one file may hold: 512 MiB as float32, 47 min of 48 kHz mono
# Declared sample rates outside this range are refused from the header: no recorder writes them, and a forged one
# makes the resampler blow up (1 Hz -> 16 kHz writes 16,000 samples per input sample: 6 GB from a 100 KB file) or,
# before the ratio search was bounded, spin forever (600 MHz -> 16 kHz).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000
_READ_BLOCK_FRAMES = 1 << 20
MAX_RESAMPLED_VALUES = MAX_AUDIO_VALUES  # samples a resampled clip may have (the resampler's output is float32)
# Bump when decoding changes what a file decodes to (resampler, mixdown, rounding): part of the cache key, so caches
# built by an older decoder are not reused (data/prepare.py adds it with the decoding libraries' versions).
DECODER_VERSION = 1


def _open_error(path: Path, err: Exception) -> DataError:
    reason = _one_line(getattr(err, "error_string", None) or err)
    return DataError(f"{path}: cannot decode: corrupt, truncated or not audio (libsndfile: {reason})")


def read_audio(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a whole audio file as a mono float32 wave in [-1, 1).

    Channels are averaged (any channel count; note that the mean of phase-inverted channels is silence).
    With ``sample_rate`` the wave is resampled to it (:func:`resample`); with ``None`` it keeps its native rate.
    Returns ``(wave, rate)`` with ``wave`` of shape ``(T,)``.

    Raises ``DataError`` for: an extension not in ``AUDIO_EXTENSIONS`` or content libsndfile does not read, a
    missing or zero-byte file, a header or stream libsndfile cannot parse (random bytes, text, a cut-off header,
    a truncated FLAC/OGG stream), a WAV whose data chunk is shorter than its header declares, a clip with no
    frames, and NaN or infinite samples (float WAVs). An all-silent clip is valid. From the header, before any
    sample is read: a declared rate outside ``MIN_SAMPLE_RATE..MAX_SAMPLE_RATE``, more than ``MAX_AUDIO_VALUES``
    samples, or more than ``MAX_RESAMPLED_VALUES`` samples once resampled to ``sample_rate``.
    """
    path = Path(path)
    _check_extension(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({_one_line(err.strerror or err)})") from None
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        with sf.SoundFile(path) as f:
            container, declared_frames, native_rate = f.format, f.frames, f.samplerate
            if container not in _CONTAINERS:
                raise DataError(f"{path}: unsupported audio format {f.format_info!r} inside a "
                                f"{path.suffix} file; supported: {AUDIO_FORMAT_NAMES}")
            if container in ("WAV", "WAVEX", "RF64", "W64"):
                # libsndfile silently clamps a WAV data chunk that runs past the end of the file; its log says so.
                m = _TRUNCATED_DATA.search(f.extra_info)
                if m and int(m.group(1)) not in _STREAMING_SIZES and int(m.group(1)) > int(m.group(2)):
                    raise DataError(f"{path}: truncated WAV: header declares {m.group(1)} bytes of audio data, "
                                    f"the file holds {m.group(2)}")
            # refused before reading: a damaged header can declare billions of frames (a 40-byte FLAC that would
            # allocate 32 GiB), and so can a recording far too long to be one sample
            check_sample_rate(path, native_rate)
            known_length = 0 < declared_frames < 2**62
            values = declared_frames * f.channels
            if known_length and values > MAX_AUDIO_VALUES:
                raise DataError(f"{path}: header declares {declared_frames:,} frames x {f.channels} channels, more "
                                f"than {MAX_AUDIO_VALUES:,} samples; a damaged file, or a recording to cut into clips")
            if known_length and sample_rate is not None:
                _check_resampled_length(path, declared_frames, native_rate, sample_rate)
            data = _read_blocks(f, MAX_AUDIO_VALUES // max(f.channels, 1) + 1)
            if data.size > MAX_AUDIO_VALUES:  # a stream of unknown length that turned out too long
                raise DataError(f"{path}: more than {MAX_AUDIO_VALUES:,} samples; cut the recording into clips")
    except DataError:
        raise
    except (RuntimeError, ValueError, OSError, EOFError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise _open_error(path, err) from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: zero-length clip (no audio frames)")
    if 0 < declared_frames < 2**62 and data.shape[0] < declared_frames:
        raise DataError(f"{path}: truncated: header declares {declared_frames} frames, only {data.shape[0]} read")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or infinite samples")
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    wave = np.ascontiguousarray(wave)
    if sample_rate is not None and sample_rate != native_rate:
        _check_resampled_length(path, len(wave), native_rate, sample_rate)  # a stream whose length was not declared
        return resample(wave, native_rate, sample_rate), sample_rate
    return wave, native_rate


def _read_blocks(f: sf.SoundFile, max_frames: int) -> np.ndarray:
    """Up to ``max_frames`` frames as float32 ``(T, channels)``, read in blocks: memory follows the frames the file
    really holds, not the count its header declares (soundfile allocates the whole declared length up front, so a
    1 KB FLAC declaring 2**27 frames took 512 MiB before failing as truncated)."""
    blocks, total = [], 0
    while total < max_frames:
        block = f.read(frames=min(_READ_BLOCK_FRAMES, max_frames - total), dtype="float32", always_2d=True)
        if not len(block):
            break
        blocks.append(block)
        total += len(block)
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)


def check_sample_rate(path: str | os.PathLike, rate: int) -> None:
    """Raise ``DataError`` naming ``path`` when a header declares a sample rate outside MIN..MAX_SAMPLE_RATE."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise DataError(f"{path}: header declares a sample rate of {rate:,} Hz, outside {MIN_SAMPLE_RATE:,}.."
                        f"{MAX_SAMPLE_RATE:,} Hz; a damaged or forged file")


def _check_resampled_length(path: Path, frames: int, native_rate: int, sample_rate: int) -> None:
    out = -(-frames * sample_rate // native_rate)
    if out > MAX_RESAMPLED_VALUES:
        raise DataError(f"{path}: {frames:,} frames at {native_rate:,} Hz resample to {out:,} samples at "
                        f"{sample_rate:,} Hz, more than {MAX_RESAMPLED_VALUES:,}; cut the recording into clips")


def decode_audio(path: str | os.PathLike, sample_rate: int, num_samples: int) -> np.ndarray:
    """Decode one file to the cache format: int16 ``(num_samples,)`` at ``sample_rate``.

    Mono mixdown and resampling as in :func:`read_audio`, then :func:`center_fit` to ``num_samples``: a longer
    clip keeps its middle, a shorter one is zero-padded equally on both sides (so the clip's centre stays at
    the window's centre either way). Floats are scaled by 32768, rounded and clipped to int16, which is exact
    for 16-bit sources at their native rate. Raises ``DataError`` naming the file (see :func:`read_audio`).
    """
    _check_positive_int("sample_rate", sample_rate)
    _check_positive_int("num_samples", num_samples)
    wave, _ = read_audio(path, sample_rate)
    wave = center_fit(wave, num_samples)
    return to_int16(wave)


def to_int16(wave: np.ndarray) -> np.ndarray:
    """Float wave in [-1, 1) -> int16, scaled by 32768, rounded, clipped to [-32768, 32767]."""
    return np.clip(np.rint(wave * INT16_SCALE), -32768, 32767).astype(np.int16)


def center_fit(wave: torch.Tensor | np.ndarray, length: int) -> torch.Tensor | np.ndarray:
    """Centre-crop or symmetrically zero-pad the last axis of ``wave`` (tensor or array) to ``length`` samples.

    A crop drops ``(T - length) // 2`` samples at the start; a pad adds ``(length - T) // 2`` zeros at the start
    and the rest at the end.
    """
    t = wave.shape[-1]
    if t == length:
        return wave
    if t > length:
        start = (t - length) // 2
        return wave[..., start:start + length]
    left = (length - t) // 2
    if isinstance(wave, np.ndarray):
        return np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(left, length - t - left)])
    return F.pad(wave, (left, length - t - left))


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --- resampling ------------------------------------------------------------------------------------------

def resample(wave: torch.Tensor | np.ndarray, orig_sr: int | float | Fraction,
             new_sr: int | float | Fraction) -> torch.Tensor | np.ndarray:
    """Band-limited resampling of the last axis of a float wave ``(..., T)`` -> ``(..., ceil(T * new / orig))``.

    Kaiser-windowed sinc interpolation (see the constants above): an anti-aliasing low-pass at 96% of the
    lower of the two Nyquist frequencies, so a downsampled tone above the new Nyquist is removed instead of
    folding back. The signal is taken as zero outside ``[0, T)``. Polyphase form (as in torchaudio): each output
    phase has its own row of filter taps, applied to every ``orig``-th window of the input.

    A torch tensor is resampled with one strided ``conv1d`` on its device (batches, augmentation on the GPU). A
    numpy array is resampled on the CPU in one thread with ``einsum``: file decoding wants that, because the cache
    parallelises over files, and intra-op threads on one short clip only contend (measured on a busy 2-core
    machine: 39 ms per FSDD clip with torch's two threads, 1 ms with einsum). Both paths agree to float32
    rounding.

    Rates are reduced to their ratio, so ``resample(x, 11, 10)`` plays ``x`` 1.1x faster (floats are first
    limited to a denominator of 1000). A ratio that does not reduce to a small fraction (44101 -> 16000) would
    need a polyphase kernel of hundreds of millions of taps; it is replaced by a close fraction whose kernel fits
    in 4M taps. Measured over every integer rate from 4 to 192 kHz into 16 kHz, that changes the rate by 0.3 ppm
    at the median and 0.05% at worst (15992 Hz is treated as 16000 Hz): under one cent of pitch. A ratio too
    extreme for any such fraction (downsampling by about 31,000x or more) raises ``ValueError``.
    """
    ratio = Fraction(orig_sr).limit_denominator(1000) / Fraction(new_sr).limit_denominator(1000)
    if ratio <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if ratio == 1:
        return wave
    is_numpy = isinstance(wave, np.ndarray)
    if not (np.issubdtype(wave.dtype, np.floating) if is_numpy else wave.is_floating_point()):
        raise TypeError(f"resample needs a floating-point wave, got {wave.dtype}")
    orig, new = _fitting_ratio(ratio)  # input samples per block, output samples per block
    shape, length = wave.shape, wave.shape[-1]
    width = _half_width(orig, new)
    out_len = -(-length * new // orig)  # ceil
    kernel = _polyphase_kernel(orig, new, width)  # (new, 1, taps) float64
    if is_numpy:
        x = np.pad(wave.reshape(-1, length), ((0, 0), (width, width + orig)))
        windows = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[-1], axis=-1)[:, ::orig]
        y = np.einsum("bwk,pk->bwp", windows, kernel[:, 0].numpy().astype(wave.dtype))  # (B, blocks, new)
        return y.reshape(y.shape[0], -1)[:, :out_len].reshape(*shape[:-1], out_len)
    x = F.pad(wave.reshape(-1, 1, length), (width, width + orig))
    y = F.conv1d(x, _device_kernel(orig, new, width, wave.device, wave.dtype), stride=orig)  # (B, new, blocks)
    return y.transpose(1, 2).reshape(-1, y.shape[1] * y.shape[2])[:, :out_len].reshape(*shape[:-1], out_len)


def _kernel_size(orig: int, new: int) -> int:
    return new * (2 * _half_width(orig, new) + orig)


def _fitting_ratio(ratio: Fraction) -> tuple[int, int]:
    """``(orig, new)`` of ``ratio``, or of the closest fraction whose polyphase kernel fits _MAX_POLYPHASE_KERNEL.

    The denominator limit at least halves on every pass, so there are at most log2(denominator) + 1 passes. A
    ratio that fits with no denominator, not even 1 (downsampling by about 31,000x or more), raises ``ValueError``.
    """
    approx, limit = ratio, ratio.denominator
    while _kernel_size(approx.numerator, approx.denominator) > _MAX_POLYPHASE_KERNEL:
        if limit <= 1:
            raise ValueError(f"cannot resample by a ratio of {float(ratio):.6g}: even the nearest whole ratio needs a "
                             f"filter of {_kernel_size(approx.numerator, approx.denominator):,} taps, more than "
                             f"{_MAX_POLYPHASE_KERNEL:,}")
        limit = min(limit, approx.denominator) // 2
        approx = ratio.limit_denominator(max(limit, 1))
    return approx.numerator, approx.denominator


def _half_width(orig: int, new: int) -> int:
    """Kernel half-width in input samples: LOWPASS_WIDTH zero crossings of a sinc at the cutoff."""
    return math.ceil(LOWPASS_WIDTH * orig / (min(orig, new) * ROLLOFF))


def _sinc_kernel(dt: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Kernel weights for input samples ``dt`` input-sample periods away from the output instant (float64)."""
    base = min(orig, new) * ROLLOFF  # low-pass bandwidth as a rate, in the units where the input rate is ``orig``
    t = (dt * (base / orig)).clamp(-LOWPASS_WIDTH, LOWPASS_WIDTH)  # in zero crossings of the sinc
    window = torch.special.i0(KAISER_BETA * torch.sqrt((1 - (t / LOWPASS_WIDTH) ** 2).clamp_min(0)))
    window = window / torch.special.i0(torch.tensor(KAISER_BETA, dtype=torch.float64))
    return torch.sinc(t) * window * (base / orig)  # torch.sinc(t) = sin(pi t) / (pi t); zero at |t| = width


@lru_cache(maxsize=32)
def _device_kernel(orig: int, new: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_polyphase_kernel` on ``device`` in ``dtype``, kept there: speed perturbation resamples every batch,
    and a host-to-device copy of the kernel each time would wait on the GPU."""
    return _polyphase_kernel(orig, new, width).to(device=device, dtype=dtype)


@lru_cache(maxsize=32)
def _polyphase_kernel(orig: int, new: int, width: int) -> torch.Tensor:
    # Output phase p (0 <= p < new) sits p / new of a block after the block start; conv tap n reads the input
    # sample n - width samples after the block start, i.e. (n - width) / orig of a block.
    phase = torch.arange(new, dtype=torch.float64)[:, None] / new
    taps = (torch.arange(2 * width + orig, dtype=torch.float64)[None, :] - width) / orig
    return _sinc_kernel((phase - taps) * orig, orig, new)[:, None, :]  # (new, 1, 2 * width + orig)


# --- probing a dataset -----------------------------------------------------------------------------------

def probe_audio(paths: Sequence[str | os.PathLike], max_files: int = 200) -> dict:
    """Describe a dataset's audio from file headers only (``soundfile.info``), to choose defaults.

    At most ``max_files`` evenly spaced files of ``paths`` are read. Returns a dict with ``sample_rate`` (the
    lower median native rate, so always a rate some file has), ``duration_s`` (median), ``p95_duration_s``,
    ``min_duration_s``, ``max_duration_s``, ``channels`` (the most common count), ``files_probed`` and
    ``unreadable`` (headers that failed; :func:`decode_audio` reports those files properly). Raises
    ``DataError`` when no probed header is readable.
    """
    paths = list(paths)
    if not paths:
        raise DataError("no audio files to probe")
    if len(paths) > max_files:
        paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, max_files).round().astype(int))]
    rates, durations, channels, first_error = [], [], [], None
    for p in paths:
        try:
            _check_extension(Path(p))
            info = sf.info(str(p))
            if info.frames <= 0:
                raise DataError(f"{p}: zero-length clip or invalid header")
            check_sample_rate(Path(p), info.samplerate)
        except (DataError, RuntimeError, ValueError, OSError) as err:
            first_error = first_error or err
            continue
        rates.append(info.samplerate)
        durations.append(info.frames / info.samplerate)
        channels.append(info.channels)
    if not rates:
        raise DataError(f"none of the {len(paths)} probed audio files is readable; first: {_one_line(first_error)}")
    d = np.asarray(durations)
    return {
        "sample_rate": int(sorted(rates)[(len(rates) - 1) // 2]),
        "duration_s": float(np.median(d)),
        "p95_duration_s": float(np.percentile(d, 95)),
        "min_duration_s": float(d.min()),
        "max_duration_s": float(d.max()),
        "channels": Counter(channels).most_common(1)[0][0],
        "files_probed": len(paths),
        "unreadable": len(paths) - len(rates),
    }


def default_duration(probe: dict, lo: float = 0.5, hi: float = 10.0) -> float:
    """Clip duration in seconds for a dataset: its 95th-percentile duration rounded up to 0.1 s, in [lo, hi].

    The 95th percentile keeps all but the longest 5% of clips whole (those are centre-cropped) without letting
    a few outliers make every batch mostly padding; 0.5 s is the shortest window that fits a spoken word and
    10 s caps memory. Examples: Speech Commands (all 1.0 s) -> 1.0; FSDD (0.14-2.28 s) -> about 0.8.
    """
    p95 = float(probe["p95_duration_s"])
    return float(min(hi, max(lo, math.ceil(round(p95 * 10, 3)) / 10)))  # round: 1.00001 s counts as 1.0
