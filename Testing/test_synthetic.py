"""glance_training.datasets.synthetic.phantom_cache: each phantom generated once, the same data as without it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from glance.phantom import PhantomConfig
from glance_training.datasets import phantom_cache, phantom_cases

SMALL = PhantomConfig((64, 64, 16), (3.0, 3.0, 6.0), n_nodules=1, vessel_points=100)


def _same(a, b) -> bool:
    return (np.array_equal(a.ct.array, b.ct.array) and np.array_equal(a.labels, b.labels)
            and a.nodules == b.nodules and a.ct.origin == b.ct.origin)


def test_phantom_cache_generates_each_config_once_with_identical_data():
    plain = [c.load() for c in phantom_cases(2, seed=5, config=SMALL)]
    again = phantom_cases(2, seed=5, config=SMALL)[0].load()
    assert again.ct.array is not plain[0].ct.array  # without the cache every load generates

    with phantom_cache() as cache:
        # Two sources from the same seeds, as two ablation variants build them.
        first = [c.load() for c in phantom_cases(2, seed=5, config=SMALL)]
        second = [c.load() for c in phantom_cases(2, seed=5, config=SMALL)]
        with phantom_cache() as inner:
            assert inner is cache  # nested: one cache
            third = phantom_cases(1, seed=5, config=SMALL)[0].load()
        assert cache.generated == 2 and cache.seconds > 0
        assert second[0].ct.array is first[0].ct.array and third.labels is first[0].labels  # shared
        assert first[1].ct.array is not first[0].ct.array  # another seed, another phantom

    for cached, generated in zip(first, plain, strict=True):
        assert _same(cached, generated)  # the cache changes nothing in the data
    assert not _same(first[0], first[1])
    after = phantom_cases(1, seed=5, config=SMALL)[0].load()
    assert after.ct.array is not first[0].ct.array and _same(after, plain[0])  # closed: generates again


def test_stored_phantoms_load_exactly_what_was_generated(tmp_path, monkeypatch, caplog):
    from glance_training.datasets import phantom_store, synthetic

    plain = phantom_cases(2, seed=5, config=SMALL)
    generated = [c.load() for c in plain]
    monkeypatch.setenv(phantom_store.ENV, str(tmp_path / "store"))
    stored = [c.load() for c in phantom_cases(2, seed=5, config=SMALL)]  # generated once more, and stored
    assert len(list((tmp_path / "store").glob("phantom-*.npz"))) == 2

    def no_generation(config):
        raise AssertionError("generated although stored")

    monkeypatch.setattr(synthetic, "_generate_phantom", no_generation)
    loaded = [c.load() for c in phantom_cases(2, seed=5, config=SMALL)]
    for a, b, c in zip(generated, stored, loaded, strict=True):
        assert _same(a, c) and _same(b, c)
        assert c.ct.array.dtype == a.ct.array.dtype and c.labels.dtype == a.labels.dtype
        assert c.ct.spacing == a.ct.spacing and np.array_equal(c.ct.direction, a.ct.direction)
        assert c.ct.metadata == a.ct.metadata and [n.kind for n in c.nodules] == [n.kind for n in a.nodules]

    # A changed generator (code, numpy or scipy) names other files: generated again, not loaded stale.
    monkeypatch.setattr(phantom_store, "generator_fingerprint", lambda: "another generator")
    with pytest.raises(AssertionError, match="generated although stored"):
        plain[0].load()

    # An unreadable file is logged, generated again and replaced.
    monkeypatch.undo()
    monkeypatch.setenv(phantom_store.ENV, str(tmp_path / "store"))
    path = phantom_store.phantom_path(tmp_path / "store", replace(SMALL, seed=plain[0].metadata["seed"]))
    path.write_bytes(b"not a phantom")
    with caplog.at_level("WARNING"):
        again = phantom_cases(1, seed=5, config=SMALL)[0].load()
    assert "cannot read the stored phantom" in caplog.text and _same(again, generated[0])
    assert np.array_equal(phantom_store.load(replace(SMALL, seed=plain[0].metadata["seed"]))[0].array,
                          generated[0].ct.array)
    # A file cut short (a full disk, a copy interrupted) is a broken zip: the same.
    path.write_bytes(path.read_bytes()[:200])
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _same(phantom_cases(1, seed=5, config=SMALL)[0].load(), generated[0])
    assert "cannot read the stored phantom" in caplog.text


def test_without_a_store_nothing_is_written(tmp_path, monkeypatch):
    from glance_training.datasets import phantom_store

    monkeypatch.delenv(phantom_store.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert phantom_store.store_dir() is None and phantom_store.load(SMALL) is None
    phantom_cases(1, seed=5, config=SMALL)[0].load()
    assert list(tmp_path.iterdir()) == []


def test_the_store_key_ignores_layout_and_comments_but_not_code():
    from glance_training.datasets.phantom_store import code_fingerprint

    source = 'def radius(d):\n    # half the diameter\n    return d / 2  # mm\n\n\nLABEL = "nodule " "core"\n'
    rewrapped = 'def radius(d):\n    return (\n        d / 2\n    )\n\n\nLABEL = "nodule core"  # one string\n'
    changed = 'def radius(d):\n    return d / 3\n\n\nLABEL = "nodule core"\n'
    assert code_fingerprint(rewrapped) == code_fingerprint(source)
    assert code_fingerprint(changed) != code_fingerprint(source)
