"""Property-based fuzzing (hypothesis), a few seconds per test:

- the config layer: any keys and values, from Python or from YAML text, end in a TrainConfig or a ValueError;
- the decoders: random bytes and damaged real files named .png/.jpg/.wav/.flac decode or raise DataError, never
  another exception, a crash or a hang (each example has a deadline).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

pytest.importorskip("hypothesis", reason="pip install -e '.[dev]' brings hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from resnetlab.data.audio import decode_audio
from resnetlab.data.errors import DataError
from resnetlab.data.images import decode_image
from resnetlab.training.config import TrainConfig, coerce, load_yaml, make_config

FIELDS = [f for f in TrainConfig.__dataclass_fields__]
# No example database: nothing is written into the repository; each run draws fresh examples.
FUZZ = settings(max_examples=150, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(["auto", "cpu", "sgd", "1e3", "nan", "-inf", "true", "0x10", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3),
                      max_leaves=8)
keys = st.sampled_from(FIELDS) | st.text(max_size=15)


@FUZZ
@given(key=keys, value=values)
def test_coerce_returns_or_raises_value_error(key, value):
    try:
        coerce(TrainConfig, key, value)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(layers=st.lists(st.dictionaries(keys, values, max_size=6), max_size=3))
def test_make_config_returns_a_config_or_raises_value_error(layers):
    try:
        cfg = make_config(TrainConfig, *layers)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, TrainConfig)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


yaml_text = st.text(max_size=200) | st.lists(
    st.tuples(st.sampled_from(FIELDS + ["bogus", "- x", "{", "[", "!!python/object:os.system", "&a", "*a"]),
              st.text(max_size=15)), max_size=6).map(lambda kv: "\n".join(f"{k}: {v}" for k, v in kv))


@FUZZ
@given(text=yaml_text | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_yaml_configs_load_or_raise_value_error(scratch, text):
    path = scratch / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        make_config(TrainConfig, load_yaml(path))
    except ValueError as e:
        assert str(e) and "\n" not in str(e)


# --- decoders -----------------------------------------------------------------------------------------------------


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _audio_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    wave = np.sin(np.arange(800) / 5).astype(np.float32) * 0.5
    sf.write(buf, wave, 8000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


SAMPLES = {".png": _image_bytes("PNG"), ".jpg": _image_bytes("JPEG"), ".wav": _audio_bytes("WAV"),
           ".flac": _audio_bytes("FLAC")}
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"GIF89a",
         b"BM", b"OggS"]


@st.composite
def damaged(draw, ext: str) -> bytes:
    """A real file of this type with random bytes overwritten and a random cut, or noise after a signature."""
    if draw(st.booleans()):
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=400))
    data = bytearray(SAMPLES[ext])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def _decode(path: Path):
    if path.suffix in (".png", ".jpg"):
        return decode_image(path, size=(8, 8), channels=3)
    return decode_audio(path, sample_rate=8000, num_samples=400)


@pytest.mark.parametrize("ext", sorted(SAMPLES))
def test_damaged_files_decode_or_raise_data_error(scratch, ext):
    path = scratch / f"sample{ext}"

    @FUZZ
    @given(data=damaged(ext))
    def check(data):
        path.write_bytes(data)
        try:
            out = _decode(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert out.shape == ((3, 8, 8) if ext in (".png", ".jpg") else (400,))

    check()
    os.remove(path)
