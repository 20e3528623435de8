"""Every row of docs/reliability.md, run; and the document checked against what the rows produce."""

from __future__ import annotations

import re

import pytest

import segtransfer as st

import reliability_cases as rc


# The "Devices" rows pass stand-ins for GPU arrays (DLPack device type 2, a null
# __cuda_array_interface__) that cannot be exported: they document a machine without a usable CUDA
# device. Where one is usable, those inputs go to the CUDA path (tests/test_cuda.py covers it there).
_GPU_HERE = st.cuda_available()


@pytest.mark.parametrize("case", rc.CASES, ids=[c.id for c in rc.CASES])
def test_case(case: rc.Case) -> None:
    if _GPU_HERE and case.group == rc.DEV and re.search(r"on_device\((?![^)]*, 10\))|CudaArrayInterface", case.expr):
        pytest.skip("describes a machine without a usable CUDA device; this one has one")
    out = rc.run(case)
    if case.raises is not None:
        assert out.exception is not None, f"accepted, returned {out.result!r}"
        assert type(out.exception) is case.raises, repr(out.exception)
        msg = str(out.exception)
        assert re.search(case.match, msg), f"message {msg!r} does not match {case.match!r}"
        assert "incompatible function arguments" not in msg and "internal" not in msg
        return
    assert out.exception is None, f"refused: {out.exception!r}"
    assert bool(out.warnings) == case.warns, out.warnings
    assert case.check is not None
    case.check(out.result)


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in rc.CASES]
    assert len(ids) == len(set(ids))


def test_reliability_doc_is_current() -> None:
    """docs/reliability.md is generated from the cases; regenerate with
    `python tests/reliability_cases.py --write` after changing a case or a message."""
    assert rc.DOC.read_text() == rc.render(), "docs/reliability.md is out of date: run python tests/reliability_cases.py --write"
