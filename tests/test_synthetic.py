"""The built-in synthetic source: determinism, real images, text, timestamps, learnability."""
from __future__ import annotations

import collections
import io
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from data_shards.raw import RawDataset
from data_shards.sources.synthetic import (
    ADJECTIVES, BRANDS, COLOUR_NAMES, DEPARTMENTS, DRIVER_MIX, PATTERN_NAMES, SHAPE_NAMES, STYLES,
    TAXONOMY, generate_synthetic, item_id, synthetic_item_attributes,
)
from data_shards.sources.synthetic_images import COLOUR_VALUES


@pytest.fixture(scope="module")
def default():
    """The default config (images lazy), shared by the tests that need the full size."""
    return generate_synthetic()


@pytest.fixture(scope="module")
def attrs():
    return synthetic_item_attributes(2000, 0)


def _index(ds: RawDataset) -> dict[str, int]:
    return {iid: k for k, iid in enumerate(ds.catalogue)}


def _sequences(ds: RawDataset) -> dict[str, list[int]]:
    index = _index(ds)
    seqs: dict[str, list[int]] = collections.defaultdict(list)
    for u, i in zip(ds.users, ds.items):
        seqs[u].append(index[i])
    return seqs


def _k_core(users: list[str], items: list[str], k: int = 5) -> tuple[set[str], set[str]]:
    pairs = set(zip(users, items))
    while True:
        ic = collections.Counter(i for _, i in pairs)
        uc = collections.Counter(u for u, _ in pairs)
        kept = {(u, i) for u, i in pairs if ic[i] >= k and uc[u] >= k}
        if kept == pairs:
            return {u for u, _ in pairs}, {i for _, i in pairs}
        pairs = kept


def _dominant_colour(data: bytes) -> int:
    """Most frequent nearest-palette colour among pixels that differ from the background."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    fg = pixels.reshape(-1, 3)
    fg = fg[np.linalg.norm(fg - background, axis=1) > 60]
    nearest = np.argmin(((fg[:, None, :] - COLOUR_VALUES[None]) ** 2).sum(-1), axis=1)
    return int(np.bincount(nearest, minlength=len(COLOUR_VALUES)).argmax())


# ---------------------------------------------------------------------------- determinism

def test_same_arguments_give_identical_dataset_and_image_bytes():
    a = generate_synthetic(num_items=300, num_users=400, seed=7)
    b = generate_synthetic(num_items=300, num_users=400, seed=7)
    assert a.users == b.users and a.items == b.items and a.timestamps == b.timestamps
    assert a.catalogue == b.catalogue
    assert a.source == b.source and a.text_fields == b.text_fields == ["title", "brand"]
    for iid in list(a.catalogue)[:60]:
        assert a.load_image(iid).data == b.load_image(iid).data
    # Image bytes do not depend on call order or on other items having been drawn before.
    last = list(a.catalogue)[-1]
    assert generate_synthetic(num_items=300, num_users=400, seed=7).load_image(last).data == \
        a.load_image(last).data


def test_different_seed_gives_different_data():
    a = generate_synthetic(num_items=300, num_users=400, seed=1)
    b = generate_synthetic(num_items=300, num_users=400, seed=2)
    assert a.items != b.items
    titles_a = [it.text_fields["title"] for it in a.catalogue.values()]
    titles_b = [it.text_fields["title"] for it in b.catalogue.values()]
    assert titles_a != titles_b
    assert a.load_image(item_id(0, 300)).data != b.load_image(item_id(0, 300)).data


def test_items_do_not_depend_on_user_options():
    a = generate_synthetic(num_items=200, num_users=50, seed=3, with_images=False)
    b = generate_synthetic(num_items=200, num_users=500, seed=3, with_images=False, mean_history=20)
    assert a.catalogue == b.catalogue


# ---------------------------------------------------------------------------- images

def test_images_are_jpegs_of_requested_size_showing_the_colour():
    ds = generate_synthetic(num_items=240, num_users=50, seed=5, image_size=48)
    attrs = synthetic_item_attributes(240, 5)
    for k, iid in enumerate(ds.catalogue):
        image = ds.load_image(iid)
        assert image.origin == f"synthetic:{iid}"
        decoded = Image.open(io.BytesIO(image.data))
        assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (48, 48)
        assert _dominant_colour(image.data) == attrs.colour[k], (iid, COLOUR_NAMES[attrs.colour[k]])


def test_shape_is_visible_in_pixels():
    """The filled fraction of the shape's bounding box tells the shape (circle ~pi/4, star ~0.4)."""
    ds = generate_synthetic(num_items=300, num_users=20, seed=0, image_size=64)
    attrs = synthetic_item_attributes(300, 0)
    extent: dict[str, list[float]] = collections.defaultdict(list)
    for k, iid in enumerate(ds.catalogue):
        pixels = np.asarray(Image.open(io.BytesIO(ds.load_image(iid).data)), dtype=np.float64)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        mask = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > 40
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        extent[SHAPE_NAMES[attrs.shape[k]]].append(mask.sum() / box)
    assert all(len(extent[name]) >= 20 for name in SHAPE_NAMES)
    assert all(0.74 < e < 0.83 for e in extent["circle"])
    assert all(e < 0.46 for e in extent["star"])
    assert np.mean(extent["square"]) > 0.75 and np.mean(extent["hexagon"]) > 0.65
    assert all(e < 0.56 for e in extent["triangle"] + extent["diamond"])


def test_without_images_load_image_is_none_and_unknown_ids_raise():
    ds = generate_synthetic(num_items=100, num_users=50, with_images=False)
    assert all(ds.load_image(iid) is None for iid in ds.catalogue)
    assert ds.source["with_images"] is False
    with pytest.raises(KeyError):
        ds.load_image("I999999")
    with pytest.raises(KeyError):
        ds.load_image("nope")


def test_load_image_pickles_for_worker_processes():
    ds = generate_synthetic(num_items=20, num_users=10, image_size=16)
    clone = pickle.loads(pickle.dumps(ds.load_image))
    assert clone(item_id(7, 20)).data == ds.load_image(item_id(7, 20)).data


def test_missing_image_rate():
    ds = generate_synthetic(num_items=400, num_users=50, missing_image_rate=0.25, image_size=16)
    missing = sum(ds.load_image(iid) is None for iid in ds.catalogue)
    assert 50 < missing < 150


# ---------------------------------------------------------------------------- text and categories

def test_titles_reveal_text_attributes_and_categories_are_three_level(default, attrs):
    assert default.text_fields == ["title", "brand"]
    leaves = {(d, g, t) for d in TAXONOMY for g in TAXONOMY[d] for t in TAXONOMY[d][g]}
    assert len(leaves) == 45
    seen_leaves = set()
    hidden = re.compile(r"\b(" + "|".join(SHAPE_NAMES + PATTERN_NAMES) + r")\b", re.IGNORECASE)
    for k, (iid, item) in enumerate(default.catalogue.items()):
        assert item.original_id == iid
        assert len(item.categories) == 1 and len(item.categories[0]) == 3
        path = tuple(item.categories[0])
        assert path in leaves and path[0] == DEPARTMENTS[attrs.department[k]]
        seen_leaves.add(path)
        title, brand = item.text_fields["title"], item.text_fields["brand"]
        assert brand == BRANDS[path[0]][attrs.brand[k]]
        for word in (brand, STYLES[attrs.style[k]], COLOUR_NAMES[attrs.colour[k]], path[2],
                     ADJECTIVES[attrs.adjective[k]]):
            assert word in title, (word, title)
        # Shape and pattern are image-only.
        assert not hidden.search(title), title
    assert seen_leaves == leaves


# ---------------------------------------------------------------------------- histories

def test_timestamps_non_decreasing_per_user_with_ties(default):
    stamps = np.array(default.timestamps)
    assert np.all(np.diff(stamps) >= 0), "file order is chronological"
    last: dict[str, float] = {}
    ties = 0
    for u, ts in zip(default.users, default.timestamps):
        if u in last:
            assert ts >= last[u]
            ties += ts == last[u]
        last[u] = ts
    assert ties > 0
    assert len(last) == 3000


def test_default_survives_five_core(default):
    counts = collections.Counter(default.users)
    assert min(counts.values()) >= 7
    assert 10 <= len(default.users) / 3000 <= 14
    users, items = _k_core(default.users, default.items)
    assert len(users) == 3000, "every user keeps >= 5 interactions"
    assert len(items) >= 0.9 * 2000
    item_counts = sorted(collections.Counter(default.items).values())
    assert item_counts[-1] > 10 * item_counts[len(item_counts) // 2], "popularity is long-tailed"


def _pair_stats(default, attrs):
    seqs = _sequences(default)
    pairs = np.array([(s[t - 1], s[t]) for s in seqs.values() for t in range(1, len(s))])
    x, y = pairs[:, 0], pairs[:, 1]
    same_dept = attrs.department[x] == attrs.department[y]
    visual = (attrs.shape[x] == attrs.shape[y]) & (attrs.pattern[x] == attrs.pattern[y])
    textual = (attrs.brand[x] == attrs.brand[y]) & (attrs.style[x] == attrs.style[y])
    companion = (attrs.companions[x] == y[:, None]).any(axis=1)
    stats = {}
    for d, name in enumerate(DEPARTMENTS):
        m = same_dept & (attrs.department[x] == d)
        stats[name] = {"visual": visual[m].mean(), "text": textual[m].mean(),
                       "companion": companion[m].mean()}
    return stats


def test_next_item_follows_attributes_in_proportions_that_vary_by_department(default, attrs):
    stats = _pair_stats(default, attrs)
    chance = 1 / 24  # 6 shapes x 4 patterns, 6 brands x 4 styles
    # "Next item shares the visual attributes of the last item" is right far above chance...
    assert stats["Apparel"]["visual"] > 12 * chance
    assert stats["Electronics"]["text"] > 12 * chance
    assert stats["Grocery"]["companion"] > 0.5
    # ...and the proportions differ by department as designed.
    assert stats["Apparel"]["visual"] > 3 * stats["Electronics"]["visual"]
    assert stats["Electronics"]["text"] > 3 * stats["Apparel"]["text"]
    assert stats["Grocery"]["companion"] > 5 * stats["Apparel"]["companion"]
    assert 0.25 < stats["Home"]["visual"] < 0.55 and 0.25 < stats["Home"]["text"] < 0.55
    assert stats["Toys"]["visual"] < 0.3 and stats["Toys"]["text"] < 0.3


def test_learnable_above_popularity_and_attributes_help_the_long_tail(default, attrs):
    """Leave-last-out HR@10 of simple scorers: attribute knowledge beats popularity, and adding it
    to ID transition counts helps most on rarely seen target items."""
    seqs = _sequences(default)
    n = len(attrs)
    pop = np.zeros(n)
    trans: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in seqs.values():
        for t in range(len(s) - 1):
            pop[s[t]] += 1
            if t:
                trans[s[t - 1]][s[t]] += 1
    look = attrs.shape * 4 + attrs.pattern
    label = attrs.brand * 4 + attrs.style

    def attribute_scores(last):
        same = attrs.department == attrs.department[last]
        vis = same & (look == look[last])
        txt = same & (label == label[last])
        w = DRIVER_MIX[attrs.department[last]]  # visual, text, co-occurrence, popularity
        by_pop = same * (pop + 1) / (pop + 1)[same].sum()
        return w[0] * vis / vis.sum() + w[1] * txt / txt.sum() + w[3] * by_pop

    def id_scores(last):
        scores = pop * 1e-6
        for item, count in trans[last].items():
            scores[item] += count
        return scores

    def both(last):
        total = max(1, sum(trans[last].values()))
        return attribute_scores(last) + 0.05 * id_scores(last) / total

    def hit_rate(score, tail_only=False):
        hits = total = 0
        for s in seqs.values():
            last, target = s[-2], s[-1]
            if tail_only and pop[target] > 8:
                continue
            scores = score(last).astype(np.float64)
            scores[s[:-1]] = -np.inf
            hits += target in np.argpartition(-scores, 10)[:10]
            total += 1
        return hits / total

    popularity = hit_rate(lambda last: pop)
    assert hit_rate(attribute_scores) > 3 * popularity
    assert hit_rate(both) > hit_rate(id_scores)
    assert hit_rate(both, tail_only=True) > 1.1 * hit_rate(id_scores, tail_only=True)


# ---------------------------------------------------------------------------- options

def test_source_records_all_options_and_validation():
    ds = generate_synthetic(num_items=50, num_users=20, seed=4, image_size=32, mean_history=9.0)
    assert ds.source["name"] == "synthetic"
    for key, value in dict(num_items=50, num_users=20, seed=4, image_size=32, mean_history=9.0,
                           with_images=True).items():
        assert ds.source[key] == value
    assert ds.name == "synthetic" and not ds.problems.counts
    with pytest.raises(ValueError, match="num_items"):
        generate_synthetic(num_items=0)
    with pytest.raises(ValueError, match="mean_history"):
        generate_synthetic(num_items=10, num_users=10, mean_history=2.0)


def test_tiny_catalogue_still_works():
    ds = generate_synthetic(num_items=3, num_users=4, seed=0, image_size=16)
    assert len(ds.catalogue) == 3 and set(ds.users) == {"U000000", "U000001", "U000002", "U000003"}
    assert all(Image.open(io.BytesIO(ds.load_image(i).data)).size == (16, 16) for i in ds.catalogue)
