"""Datasets shipped inside the package, addressed as ``builtin:<name>`` wherever a dataset path is accepted.

They are small subsets, enough for a first run, a tutorial or a test without any download; each folder holds its
own LICENSE.txt.
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.data.errors import DataError

PREFIX = "builtin:"
_ROOT = Path(__file__).resolve().parent / "builtin"

# name -> (folder, description, license)
BUILTINS: dict[str, tuple[Path, str, str]] = {
    "digits": (
        _ROOT / "digits",
        "MNIST subset: 28x28 grayscale handwritten digits, 10 classes, 500 train / 100 test images per class "
        "(seeded sample of the official split; train/ and test/ class folders of PNGs)",
        "CC BY-SA 3.0 (LeCun, Cortes, Burges); PNG conversion rasbt/mnist-pngs (MIT)",
    ),
    "spoken-digits": (
        _ROOT / "spoken_digits",
        "Free Spoken Digit Dataset subset: spoken English digits 0-9, 8 kHz mono WAV",
        "CC BY-SA 4.0 (Jakobovski/free-spoken-digit-dataset)",
    ),
}


def resolve_builtin(name_or_path: str) -> str:
    """Map ``"builtin:<name>"`` to the folder of that shipped dataset; any other string is returned unchanged.

    Raises ``DataError`` for an unknown name (listing the known ones) and for a known one whose files are missing
    from this installation.
    """
    if not isinstance(name_or_path, str) or not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX):]
    if name not in BUILTINS:
        known = ", ".join(PREFIX + n for n in BUILTINS)
        raise DataError(f"unknown built-in dataset {name_or_path!r}; known: {known}")
    folder = BUILTINS[name][0]
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise DataError(f"built-in dataset {name_or_path!r} has no files at {folder} (incomplete installation?)")
    return str(folder)
