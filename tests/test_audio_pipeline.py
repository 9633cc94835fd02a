"""The audio pipeline end to end: config round trip, layouts that feed the speech models, real recordings."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import resnetlab
from resnetlab.data.audio import decode_audio, default_duration, probe_audio
from resnetlab.data.audio_pipeline import AudioPipeline
from resnetlab.data.pipeline import Pipeline

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPEECH_COMMANDS = SHARED / "speech_commands_mini.tar.gz"
BUILTIN = Path(resnetlab.__file__).parent / "data" / "builtin" / "spoken_digits"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def waves(n: int = 4, t: int = 16000, seed: int = 0) -> torch.Tensor:
    """int16 clips: a tone burst plus a little noise, at different levels."""
    rng = np.random.default_rng(seed)
    time = np.arange(t) / 16000
    out = []
    for i in range(n):
        x = 0.01 * rng.standard_normal(t)
        x[t // 4: 3 * t // 4] += (0.1 + 0.1 * i) * np.sin(2 * np.pi * (300 + 200 * i) * time[t // 4: 3 * t // 4])
        out.append(np.clip(np.rint(x * 32768), -32768, 32767))
    return torch.from_numpy(np.stack(out).astype(np.int16))


@pytest.fixture(scope="session")
def speech_commands_clips(tmp_path_factory) -> list[Path]:
    """Two real 16 kHz recordings from the Speech Commands subset (unpacked from the shared tarball)."""
    if not SPEECH_COMMANDS.exists():
        pytest.skip(f"{SPEECH_COMMANDS} not available")
    out = tmp_path_factory.mktemp("speech_commands")
    with tarfile.open(SPEECH_COMMANDS, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".wav")]
        chosen = [next(m for m in members if f"/{word}/" in m.name) for word in ("yes", "seven")]
        tar.extractall(out, members=chosen, filter="data")
    return [out / m.name for m in chosen]


# --- protocol ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("features", ["logmel", "mfcc"])
@pytest.mark.parametrize("normalize", ["utterance", "global", "none"])
def test_config_round_trip_gives_identical_eval_outputs(features, normalize):
    p = AudioPipeline(num_classes=10, features=features, n_mfcc=20, normalize=normalize, noise_prob=0.7,
                      snr_db=(3.0, 12.0), speed_perturb=True)
    x = waves()
    if normalize == "global":
        p.fit_normalization(x)
    cfg = json.loads(json.dumps(p.config()))
    assert cfg["modality"] == "audio" and cfg["num_classes"] == 10
    q = AudioPipeline.from_config(cfg)
    assert q.config() == p.config()
    a, ya = p(x, torch.arange(4), train=False)
    b, yb = q(x, torch.arange(4), train=False)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert isinstance(q, Pipeline) and q.modality == "audio"


def test_build_pipeline_dispatches_on_modality():
    pytest.importorskip("resnetlab.data.image_pipeline")  # build_pipeline imports both pipelines
    from resnetlab.data.pipeline import build_pipeline

    p = build_pipeline(AudioPipeline(num_classes=3, features="mfcc").config())
    assert isinstance(p, AudioPipeline) and p.features == "mfcc"


def test_eval_is_deterministic_and_train_is_seeded():
    p = AudioPipeline(num_classes=2, speed_perturb=True, noise_prob=1.0)
    x = waves()
    ev, _ = p(x, None, train=False, generator=gen(1))
    assert torch.equal(ev, p(x, None, train=False, generator=gen(2))[0])
    tr1, _ = p(x, None, train=True, generator=gen(1))
    assert tr1.shape == ev.shape and tr1.dtype == torch.float32
    assert torch.equal(tr1, p(x, None, train=True, generator=gen(1))[0])
    assert not torch.equal(tr1, p(x, None, train=True, generator=gen(2))[0])
    assert not torch.equal(tr1, ev)


def test_layouts_feed_the_speech_models():
    x = waves(2)
    p2 = AudioPipeline(num_classes=10, layout="2d")
    inputs, _ = p2(x, None, train=True, generator=gen())
    assert inputs.shape == (2, *p2.input_size()) == (2, 1, 40, 101)
    res8 = resnetlab.create_model("res8", num_classes=10).eval()
    assert res8(inputs).shape == (2, 10)

    p1 = AudioPipeline(num_classes=10, layout="1d", features="mfcc", n_mfcc=40)
    inputs, _ = p1(x, None, train=False)
    assert inputs.shape == (2, *p1.input_size()) == (2, 40, 101)
    tc = resnetlab.create_model("tc_resnet8", num_classes=10).eval()
    assert tc(inputs).shape == (2, 10)


def test_input_size_follows_the_settings():
    p = AudioPipeline(num_samples=12800, sample_rate=16000, n_mels=64, hop_length=320, layout="1d")
    assert p.input_size() == (64, 41)
    assert p(torch.zeros(1, 12800, dtype=torch.int16), None, train=False)[0].shape == (1, 64, 41)


def test_utterance_normalisation_removes_the_level():
    x = waves(1)
    p = AudioPipeline()
    loud = torch.clamp(x.int() * 4, -32768, 32767).short()
    a, b = p(x, None, train=False)[0], p(loud, None, train=False)[0]
    assert abs(a.mean().item()) < 1e-4 and a.std().item() == pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(a, b, atol=0.05, rtol=0)  # a gain is a shift in log-mel (up to the floor)


def test_global_normalisation_fit_and_errors():
    x = waves(8)
    p = AudioPipeline(normalize="global")
    with pytest.raises(RuntimeError, match="fit_normalization"):
        p(x, None, train=False)
    mean, std = p.fit_normalization(x, batch_size=3)
    feats = p.features_only(x)
    assert mean == pytest.approx(feats.double().mean().item(), rel=1e-6)
    assert std == pytest.approx(feats.double().std(unbiased=False).item(), rel=1e-5)
    out = p(x, None, train=False)[0]
    assert abs(out.mean().item()) < 1e-4 and out.std().item() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="constant"):
        AudioPipeline(normalize="global").fit_normalization(torch.zeros(2, 16000, dtype=torch.int16))


def test_features_only_is_the_raw_front_end():
    x = waves(2)
    p = AudioPipeline(time_shift_ms=100, noise_prob=1.0)
    feats = p.features_only(x)
    assert feats.shape == (2, 40, 101)
    torch.testing.assert_close(feats, p.frontend(x.float() / 32768))


def test_spec_augment_masks_reach_the_output():
    p = AudioPipeline(time_shift_ms=0, noise_prob=0, freq_masks=1, freq_width=10, time_masks=1, time_width=20)
    out = p(waves(32), None, train=True, generator=gen())[0][:, 0]
    masked_rows = (out == 0).all(dim=2).sum(1)
    assert masked_rows.max() <= 10 and masked_rows.float().mean() > 2


def test_noise_folder_is_read_only_for_training(tmp_path):
    noise = tmp_path / "noise"
    noise.mkdir()
    sf.write(noise / "hum.wav", 0.3 * np.sin(2 * np.pi * 50 * np.arange(48000) / 16000), 16000)
    p = AudioPipeline(noise_dir=noise, noise_prob=1.0, snr_db=(0.0, 0.0), time_shift_ms=0, spec_augment=False,
                      normalize="none")
    x = waves(4)
    out = p(x, None, train=True, generator=gen())[0]
    assert p.noise_bank().shape == (2, 32000)  # 3 s of noise in 2 s segments: the first 2 s and the last 2 s
    assert not torch.equal(out, p(x, None, train=False)[0])
    # The lowest band (20-90 Hz) now holds the 50 Hz hum at 0 dB SNR.
    assert (out[:, 0, 0] - p(x, None, train=False)[0][:, 0, 0]).mean() > 3
    cfg = p.config()
    cfg["noise_dir"] = str(tmp_path / "moved_away")
    q = AudioPipeline.from_config(cfg)
    assert torch.equal(q(x, None, train=False)[0], p(x, None, train=False)[0])


def test_bad_inputs_and_arguments():
    p = AudioPipeline(num_samples=16000)
    with pytest.raises(ValueError, match=r"\(N, 16000\)"):
        p(torch.zeros(2, 8000, dtype=torch.int16), None, train=False)
    with pytest.raises(TypeError, match="int16"):
        p(torch.zeros(2, 16000, dtype=torch.int32), None, train=False)
    for kwargs, match in (({"features": "mel"}, "features"), ({"layout": "3d"}, "layout"),
                          ({"normalize": "batch"}, "normalize"), ({"noise_prob": 1.5}, "noise_prob"),
                          ({"snr_db": (20, 10)}, "snr_db"), ({"mean": 1.0}, "std"),
                          ({"num_samples": 0}, "num_samples"), ({"speed_factors": (0.0, 1.0)}, "speed_factors"),
                          ({"n_mfcc": 41, "features": "mfcc"}, "n_mfcc"), ({"win_length": 600}, "win_length")):
        with pytest.raises(ValueError, match=match):
            AudioPipeline(**kwargs)
    with pytest.raises(ValueError, match="modality"):
        AudioPipeline.from_config({"modality": "image"})


def test_autocast_does_not_lower_feature_precision():
    p = AudioPipeline()
    x = waves(2)
    ref = p(x, None, train=False)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = p(x, None, train=False)[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


# --- real recordings --------------------------------------------------------------------------------------

def test_real_speech_commands_clip_decodes_and_featurizes(speech_commands_clips):
    clips = np.stack([decode_audio(path, 16000, 16000) for path in speech_commands_clips])
    assert clips.dtype == np.int16 and clips.shape == (2, 16000)
    info = sf.info(str(speech_commands_clips[0]))
    assert info.samplerate == 16000
    raw, _ = sf.read(speech_commands_clips[0], dtype="int16")
    if len(raw) == 16000:  # a full-length clip is stored sample for sample
        np.testing.assert_array_equal(clips[0], raw)
    x = torch.from_numpy(clips)
    p = AudioPipeline(num_classes=30)
    feats = p.features_only(x)
    assert torch.isfinite(feats).all()
    # Speech is louder than the quietest frames by tens of dB.
    frame_energy = feats.exp().sum(1)
    assert 10 * math.log10(frame_energy.max() / frame_energy.min()) > 20
    model = resnetlab.create_model("res8", num_classes=30).eval()
    assert model(p(x, None, train=False)[0]).shape == (2, 30)


def test_builtin_spoken_digits_subset():
    if not BUILTIN.exists():
        pytest.skip("builtin spoken digits not generated (scripts/make_builtin_speech.py)")
    train = sorted((BUILTIN / "train").rglob("*.flac")) + sorted((BUILTIN / "train").rglob("*.wav"))
    test = sorted((BUILTIN / "test").rglob("*.flac")) + sorted((BUILTIN / "test").rglob("*.wav"))
    assert len(test) == 300 and len(train) >= 240
    assert sum(p.stat().st_size for p in BUILTIN.rglob("*") if p.is_file()) < 4_000_000
    assert (BUILTIN / "LICENSE.txt").read_text().count("CC BY-SA 4.0") == 1
    for path in test[:30]:  # folder = the spoken digit = the file name's first field
        assert path.parent.name == path.name.split("_")[0] and int(path.stem.split("_")[2]) <= 4
    assert all(int(p.stem.split("_")[2]) >= 5 for p in train)
    probe = probe_audio(train)
    assert probe["sample_rate"] == 8000 and probe["channels"] == 1
    duration = default_duration(probe)
    assert 0.5 <= duration <= 1.5
    x = decode_audio(train[0], 16000, round(duration * 16000))
    assert x.shape == (round(duration * 16000),) and np.abs(x).max() > 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipeline_on_cuda_matches_cpu_and_follows_the_data():
    x = waves(8)
    p = AudioPipeline(num_classes=10, speed_perturb=True, noise_prob=1.0)
    ref = p(x, None, train=False)[0]
    out = p(x.cuda(), None, train=False)[0]  # the pipeline moves itself to the batch's device
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=1e-3)
    g = torch.Generator(device="cuda").manual_seed(0)
    tr = p(x.cuda(), None, train=True, generator=g)[0]
    assert tr.shape == ref.shape and torch.isfinite(tr).all()
