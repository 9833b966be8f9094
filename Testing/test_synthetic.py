"""glance_training.datasets.synthetic.phantom_cache: each phantom generated once, the same data as without it."""

from __future__ import annotations

import numpy as np

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
