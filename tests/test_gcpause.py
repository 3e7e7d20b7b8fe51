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


def test_a_plan_leaves_nothing_frozen(tmp_path):
    """`plan()` keeps its objects out of the collections while it makes them, and nothing frozen after: a
    library's process goes on, and what it held in cycles must stay collectable."""
    import chatvec_dist
    from chatvec_dist.demo import make_demo_models

    models = make_demo_models(tmp_path / "demo")
    recipe = chatvec_dist.make_recipe(str(models["base"]), str(models["chat"]), str(models["cp"]), str(tmp_path / "o"))
    gc.unfreeze()
    gc.enable()
    planned = chatvec_dist.plan(recipe)
    assert planned.units and gc.get_freeze_count() == 0 and gc.isenabled()
