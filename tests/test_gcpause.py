"""gcpause.kept: no collection inside the block, what it leaves alive out of later collections, the collector as
it was before (enabled or not), an error inside included."""

from __future__ import annotations

import gc

import pytest

from chatvec_dist import gcpause


@pytest.fixture(autouse=True)
def _restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()


def test_kept_freezes_what_the_block_made_and_collects_nothing_inside():
    gc.enable()
    before = gc.get_freeze_count()
    with gcpause.kept():
        assert not gc.isenabled()
        made = [[k] for k in range(10_000)]  # tracked objects, kept
        assert gc.get_count()[0] >= 10_000  # none collected inside: generation 0 counts them all
    assert gc.isenabled() and gc.get_freeze_count() >= before + len(made)
    scanned = {id(o) for g in range(3) for o in gc.get_objects(g)}  # what collections scan
    assert not scanned & set(map(id, made))
    gc.disable()
    with gcpause.kept():
        pass
    assert not gc.isenabled()  # left as it was


def test_kept_restores_the_collector_after_an_error():
    gc.enable()
    with pytest.raises(ValueError), gcpause.kept():
        raise ValueError("inside")
    assert gc.isenabled()
