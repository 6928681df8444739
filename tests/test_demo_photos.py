"""``jlrp demo`` (:mod:`jlrp.demos.photos`) on scikit-image's photos, with a tiny stand-in classifier
(the real EfficientNet-Lite0 run is the README's main command): files, table, seeding, bad settings."""

from __future__ import annotations

import csv

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from jlrp.cli import main  # noqa: E402
from jlrp.demos import photos  # noqa: E402

SIZE = 32


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(4)(x.reshape((x.shape[0], -1)))


def tiny_bundle():
    model = Tiny()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))

    def preprocess(image):
        return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float32) / 255

    return photos.PhotoModel("tiny", model, variables, preprocess, ["w", "x", "y", "z"], (0.0, 1.0))


def test_photo_demo_writes_figure_table_and_arrays_seeded(tmp_path, capsys):
    bundle = tiny_bundle()
    kwargs = dict(photos=("chelsea", "coffee"), model=bundle, patch=8, n_steps=4, n_iter=2, progress=False)
    result = photos.run_photo_demo(tmp_path / "a", **kwargs)
    again = photos.run_photo_demo(tmp_path / "b", **kwargs)
    printed = capsys.readouterr().out
    methods = [s.method for s in result.scores]
    assert methods == [
        "EpsilonGammaBox",
        "EpsilonPlusFlat",
        "EpsilonAlpha2Beta1",
        "Gradient",
        "SmoothGrad",
        "IntegratedGradients",
        "Random",
    ]
    for method in methods:
        assert method in printed
    assert "MoRF AUC" in printed and "chelsea" in printed
    a, b = ((run / "perturbation.csv").read_text() for run in (tmp_path / "a", tmp_path / "b"))
    assert a == b  # seeded
    rows = list(csv.DictReader(open(tmp_path / "a" / "perturbation.csv")))
    assert [r["method"] for r in rows] == methods
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("morf_auc", "lerf_auc", "aopc"))
    assert (tmp_path / "a" / "perturbation.md").read_text().count("|") > 7 * 4

    # the figure: one row per photo, photo + 6 heatmaps per row
    with Image.open(tmp_path / "a" / "figure.png") as figure:
        width, height = figure.size
    assert width >= 7 * photos.CELL and height >= 2 * photos.CELL
    data = np.load(tmp_path / "a" / "relevance.npz")
    assert set(methods) <= set(data.files)
    assert data["EpsilonPlusFlat"].shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(data["predicted"], np.asarray(result.predicted))
    logits = bundle.model.apply(bundle.variables, jnp.asarray(data["inputs"]))
    np.testing.assert_array_equal(np.argmax(logits, -1), result.predicted)
    assert list(data["class_names"]) == [bundle.classes[c] for c in result.predicted]
    assert result.probability == again.probability

    # the table's LeRF AUC is region_perturbation's, order='lerf', on the saved relevance
    from jlrp import metrics

    x = jnp.asarray(data["inputs"])
    for row in rows[:2]:
        lerf = metrics.region_perturbation(
            bundle.model.apply,
            x,
            jnp.asarray(data[row["method"]]),
            jnp.asarray(data["predicted"]),
            params=bundle.variables,
            order="lerf",
            patch_size=8,
            n_steps=4,
        )
        np.testing.assert_allclose(float(row["lerf_auc"]), float(jnp.nanmean(lerf.auc)), rtol=1e-5, atol=1e-6)


def test_demo_bad_photo_is_one_line(tmp_path, capsys):
    assert main(["demo", "--photos", "chelsea,unicorn", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown photo 'unicorn'" in lines[0]
    assert not (tmp_path / "o").exists()
