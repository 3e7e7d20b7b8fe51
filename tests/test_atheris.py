"""Optional coverage-guided fuzzing of the header parser with atheris (skipped where atheris is not installed).

Longer campaigns: `python tests/test_atheris.py -runs=1000000 -max_len=4096 [corpus_dir]`.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def one_input(data: bytes) -> None:
    from chatvec_dist.errors import HeaderError
    from chatvec_dist.io.header import parse_header_bytes

    if data[:1] == b"{":  # a JSON body: frame it, so that the fuzzer spends its time past the length check
        body, _, rest = data.partition(b"\0")
        data = struct.pack("<Q", len(body)) + body + rest
    with contextlib.suppress(HeaderError):
        parse_header_bytes(data, len(data), "fuzz")


SEEDS = [
    b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]},'
    b'"b":{"dtype":"BF16","shape":[],"data_offsets":[8,10]}}\0' + bytes(10),
    b'{"x":{"dtype":"I64","shape":[0],"data_offsets":[0,0]}}\0',
]


def test_atheris_header_fuzz_smoke(tmp_path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(seed)
    done = subprocess.run(
        [sys.executable, __file__, "-runs=20000", "-max_len=2048", "-seed=1", str(corpus)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # crash files land in tmp_path
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["chatvec_dist"]):
        import chatvec_dist.io.header  # noqa: F401
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
