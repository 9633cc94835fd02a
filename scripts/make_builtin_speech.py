"""Make the embedded ``builtin:spoken-digits`` dataset: a fixed subset of the Free Spoken Digit Dataset (FSDD).

    python scripts/make_builtin_speech.py [--tarball /work/shared/data/fsdd.tar.gz] [--format flac|wav]

FSDD names its clips ``{digit}_{speaker}_{index}.wav`` (6 speakers x 10 digits x 50 takes, 8 kHz mono 16-bit);
its official split puts takes 0-4 in the test set and 5-49 in the training set. This script keeps the whole
official test set (takes 0-4: 300 clips) and takes ``--train-first``..``--train-last`` (default 5-14: 600
clips) of the training set, and rewrites ``src/resnetlab/data/builtin/spoken_digits/{train,test}/{0..9}/`` with
them plus a LICENSE.txt. Every speaker is in both splits, as in the official split.

Clips keep their FSDD names. By default they are stored as FLAC, losslessly (the script checks every sample
survives): that halves the size, so ten takes per speaker and digit fit the package's 4 MB budget where WAV
would allow four. ``--format wav`` copies the original files byte for byte instead. Only the chosen members are
unpacked (into a temporary folder); rerunning gives identical output.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARBALL = REPO.parent / "shared" / "data" / "fsdd.tar.gz"
DEFAULT_OUT = REPO / "src" / "resnetlab" / "data" / "builtin" / "spoken_digits"
TARBALL_SHA256 = "b163fbe68bb8de814f20709ddf0238a01f25857a27bc7fcd07652be420dccdd3"
MEMBER = re.compile(r"^fsdd/recordings/([0-9])_([a-z]+)_(\d+)\.wav$")
MAX_BYTES = 4_000_000

LICENSE = """\
builtin:spoken-digits is a subset of the Free Spoken Digit Dataset (FSDD): spoken digits 0-9 in English,
8 kHz mono 16-bit, 6 speakers ({speakers}).
  test:  takes 0-4 of every speaker and digit, the official FSDD test set ({n_test} clips)
  train: takes {first}-{last} of every speaker and digit, from the official training takes 5-49 ({n_train} clips)
Made by scripts/make_builtin_speech.py; file names are FSDD's, {{digit}}_{{speaker}}_{{take}}, {storage}.

Free Spoken Digit Dataset
  Zohar Jackson (Jakobovski) and contributors
  https://github.com/Jakobovski/free-spoken-digit-dataset
  License: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),
  https://creativecommons.org/licenses/by-sa/4.0/
  This subset is redistributed under the same license.
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store(src: Path, dst: Path, fmt: str) -> None:
    """Copy a WAV, or re-encode it as 16-bit FLAC and check the samples are unchanged."""
    if fmt == "wav":
        shutil.copyfile(src, dst)
        return
    data, rate = sf.read(src, dtype="int16")
    sf.write(dst, data, rate, format="FLAC", subtype="PCM_16")
    back, back_rate = sf.read(dst, dtype="int16")
    if back_rate != rate or not np.array_equal(back, data):
        raise SystemExit(f"{dst}: FLAC round trip changed the audio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--format", choices=("flac", "wav"), default="flac")
    parser.add_argument("--train-first", type=int, default=5, help="first training take (>= 5)")
    parser.add_argument("--train-last", type=int, default=14, help="last training take (<= 49)")
    args = parser.parse_args()
    if not 5 <= args.train_first <= args.train_last <= 49:
        raise SystemExit(f"need 5 <= --train-first <= --train-last <= 49, got {args.train_first}..{args.train_last}")

    digest = sha256(args.tarball)
    if digest != TARBALL_SHA256:
        raise SystemExit(f"{args.tarball}: sha256 {digest} does not match the expected {TARBALL_SHA256}")

    with tarfile.open(args.tarball, "r:gz") as tar:
        chosen: list[tuple[str, tarfile.TarInfo]] = []
        speakers = set()
        for m in tar.getmembers():
            match = MEMBER.match(m.name)
            if not (match and m.isfile()):
                continue
            take = int(match.group(3))
            speakers.add(match.group(2))
            if take <= 4:
                chosen.append(("test", m))
            elif args.train_first <= take <= args.train_last:
                chosen.append(("train", m))
        chosen.sort(key=lambda sm: (sm[0], sm[1].name))
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp, members=[m for _, m in chosen], filter="data")
            if args.out.exists():
                shutil.rmtree(args.out)
            for split, m in chosen:
                digit = MEMBER.match(m.name).group(1)
                dst = args.out / split / digit / Path(m.name).with_suffix(f".{args.format}").name
                dst.parent.mkdir(parents=True, exist_ok=True)
                store(Path(tmp) / m.name, dst, args.format)

    n_test = sum(split == "test" for split, _ in chosen)
    storage = "re-encoded losslessly as FLAC" if args.format == "flac" else "the original WAV files"
    (args.out / "LICENSE.txt").write_text(LICENSE.format(
        speakers=", ".join(sorted(speakers)), n_test=n_test, n_train=len(chosen) - n_test,
        first=args.train_first, last=args.train_last, storage=storage))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(chosen)} clips ({len(chosen) - n_test} train, {n_test} test; {total / 1e6:.2f} MB) "
          f"to {args.out}")
    if total > MAX_BYTES:
        raise SystemExit(f"{args.out}: {total / 1e6:.2f} MB exceeds the {MAX_BYTES / 1e6:.0f} MB budget; "
                         f"choose fewer training takes")


if __name__ == "__main__":
    main()
