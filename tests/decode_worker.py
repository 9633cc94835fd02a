"""Decode files one after another and report each outcome: the subprocess of tests/test_fuzz.py's wall-clock fuzzer.

    python decode_worker.py MANIFEST.json START

MANIFEST is a JSON list of ``[path, kind]`` (kind ``"image"`` or ``"audio"``); decoding starts at index START. Prints
``ready`` once imported, then for each file ``start I`` before decoding it and ``[I, outcome, detail]`` (JSON) after:
outcome ``ok`` (an array of the expected shape), ``data-error`` (a one-line DataError naming the file), or anything
else, which is a finding (``bad-shape``, ``bad-message``, or an exception's type name). The parent kills a worker that
stays silent past its per-file limit (a hang) and notices one that dies (a crash). The address space is capped a
little above what the imports take, so an unbounded allocation is a MemoryError here, not a swapping machine.
"""

from __future__ import annotations

import json
import resource
import sys

EXTRA_ADDRESS_SPACE = 1536 << 20  # bytes above the footprint after imports; the largest legitimate case is ~0.6 GB


def main() -> None:
    manifest = json.loads(open(sys.argv[1], encoding="utf-8").read())
    start = int(sys.argv[2])
    from resnetlab.data.audio import decode_audio
    from resnetlab.data.errors import DataError
    from resnetlab.data.images import decode_image

    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + EXTRA_ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print("ready", flush=True)
    for i in range(start, len(manifest)):
        path, kind = manifest[i]
        print(f"start {i}", flush=True)
        detail = ""
        try:
            if kind == "image":
                out, shape = decode_image(path, (8, 8), 3), (3, 8, 8)
            else:
                out, shape = decode_audio(path, 8000, 400), (400,)
            outcome = "ok" if out.shape == shape else "bad-shape"
            detail = str(out.shape)
        except DataError as e:
            detail = str(e)
            outcome = "data-error" if "\n" not in detail and path in detail else "bad-message"
        except BaseException as e:  # noqa: B036 - MemoryError, KeyboardInterrupt from a signal: all findings
            outcome, detail = type(e).__name__, " ".join(str(e).split())[:300]
        print(json.dumps([i, outcome, detail[:300]]), flush=True)


if __name__ == "__main__":
    main()
