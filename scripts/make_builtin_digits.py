"""Make the embedded ``builtin:digits`` dataset: a fixed, seeded MNIST subset of PNGs inside the package.

    python scripts/make_builtin_digits.py [--tarball /work/shared/data/mnist.tar.gz]

Reads ``mnist/{train,test}/{0-9}/N.png`` (the official split) from the tarball, picks ``--train-per-class``
and ``--test-per-class`` files per class with a seeded sample, and rewrites
``src/resnetlab/data/builtin/digits/{train,test}/{0..9}/`` with them plus a LICENSE.txt. Only the chosen
members are unpacked (into a temporary folder); rerunning gives byte-identical output.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARBALL = REPO.parent / "shared" / "data" / "mnist.tar.gz"
DEFAULT_OUT = REPO / "src" / "resnetlab" / "data" / "builtin" / "digits"
TARBALL_SHA256 = "d1fc139c87c53a5d1363e4c8767f67bb4ec6ee471790099bb5c0ea70aa510181"
MEMBER = re.compile(r"^mnist/(train|test)/([0-9])/(\d+)\.png$")

LICENSE = """\
builtin:digits is a subset of MNIST: {n_train} training images ({train_per_class} per class) and {n_test} test
images ({test_per_class} per class), sampled with seed {seed} from the official 60,000 / 10,000 split by
scripts/make_builtin_digits.py. File names are the image indices of the source PNG collection.

MNIST handwritten digit database
  Yann LeCun, Corinna Cortes, Christopher J.C. Burges
  License: Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0),
  https://creativecommons.org/licenses/by-sa/3.0/
  This subset is redistributed under the same license.

PNG conversion: rasbt/mnist-pngs (https://github.com/rasbt/mnist-pngs)
  Copyright (c) Sebastian Raschka
  License: MIT
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digest = sha256(args.tarball)
    if digest != TARBALL_SHA256:
        raise SystemExit(f"{args.tarball}: sha256 {digest} does not match the expected {TARBALL_SHA256}")

    with tarfile.open(args.tarball, "r:gz") as tar:
        members: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in tar.getmembers():
            match = MEMBER.match(m.name)
            if match and m.isfile():
                members.setdefault(match.group(1, 2), []).append(m)
        chosen = []
        for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
            for digit in map(str, range(10)):
                pool = sorted(members.get((split, digit), []), key=lambda m: int(MEMBER.match(m.name).group(3)))
                if len(pool) < per_class:
                    raise SystemExit(f"{split}/{digit}: only {len(pool)} images in the tarball, need {per_class}")
                picked = random.Random(f"{args.seed}:{split}:{digit}").sample(pool, per_class)
                chosen += sorted(picked, key=lambda m: int(MEMBER.match(m.name).group(3)))
        with tempfile.TemporaryDirectory() as tmp:
            tar.extractall(tmp, members=chosen, filter="data")
            if args.out.exists():
                shutil.rmtree(args.out)
            for m in chosen:
                dst = args.out / Path(m.name).relative_to("mnist")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / m.name, dst)

    (args.out / "LICENSE.txt").write_text(LICENSE.format(
        n_train=10 * args.train_per_class, n_test=10 * args.test_per_class, train_per_class=args.train_per_class,
        test_per_class=args.test_per_class, seed=args.seed))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(chosen)} images ({total / 1e6:.2f} MB) to {args.out}")


if __name__ == "__main__":
    main()
