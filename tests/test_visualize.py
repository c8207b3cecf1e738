"""Tests for mrcnn.visualize: every function draws headless (Agg) on small synthetic data."""

import os
import types

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mrcnn import visualize  # noqa: E402

CLASS_NAMES = ["BG", "shirt", "pants", "shoe"]


@pytest.fixture(autouse=True)
def _no_show_and_cleanup(monkeypatch):
    """plt.show() must never be called under Agg; close whatever a test left open."""
    def fail_show(*args, **kwargs):
        raise AssertionError("plt.show() called on a non-interactive backend")
    monkeypatch.setattr(plt, "show", fail_show)
    yield
    plt.close("all")


def _scene(h=64, w=80):
    """A grey image with a soft gradient and three instances (two rectangles, one disc)."""
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([100 + xx * 0.2, 110 + yy * 0.2, np.full((h, w), 120.0)], axis=-1)
    image = image.astype(np.uint8)
    masks = np.zeros((h, w, 3), dtype=bool)
    masks[5:25, 5:30, 0] = True
    masks[30:60, 40:75, 1] = True
    masks[:, :, 2] = (yy - 45) ** 2 + (xx - 18) ** 2 < 10 ** 2
    boxes = np.array([[5, 5, 25, 30], [30, 40, 60, 75], [35, 8, 56, 29]])
    class_ids = np.array([1, 2, 1])
    return image, boxes, masks, class_ids


def _load_png(path):
    assert os.path.isfile(path), "figure not written: %s" % path
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 10 and img.shape[1] > 10
    return img


def _assert_not_blank(path):
    img = _load_png(path)
    assert img[..., :3].std() > 0, "saved figure is blank"
    return img


############################################################
#  Colours and masks
############################################################

def test_random_colors_distinct_rgb_in_unit_range():
    for n in (1, 2, 7, 30):
        colors = visualize.random_colors(n)
        assert len(colors) == n
        assert len(set(colors)) == n
        for c in colors:
            assert len(c) == 3
            assert all(0.0 <= v <= 1.0 for v in c)
    dark = visualize.random_colors(5, bright=False)
    assert max(max(c) for c in dark) <= 0.7 + 1e-9
    assert visualize.random_colors(0) == []
    assert visualize.random_colors(6, seed=3) == visualize.random_colors(6, seed=3)


def test_apply_mask_blends_exactly_inside_and_keeps_outside():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(20, 30, 3))
    mask = rng.random((20, 30)) > 0.5
    color, alpha = (0.2, 0.4, 0.9), 0.3
    original = image.copy()
    out = visualize.apply_mask(image, mask, color, alpha=alpha)
    expected = np.where(mask[..., None],
                        alpha * np.array(color) * 255 + (1 - alpha) * original, original)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)
    assert np.array_equal(out[~mask], original[~mask])
    assert out is image  # in place, as matterport


def test_apply_mask_accepts_01_masks_and_default_alpha():
    image = np.full((4, 4, 3), 100.0)
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 2] = 1
    visualize.apply_mask(image, mask, (1.0, 0.0, 0.0))
    np.testing.assert_allclose(image[1, 2], [0.5 * 255 + 50, 50, 50])
    assert np.all(image[0, 0] == 100)


def test_draw_box_outlines_in_place():
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    out = visualize.draw_box(image, (2, 3, 10, 12), (255, 0, 0))
    assert out is image
    assert np.all(image[2, 3:12, 0] == 255) and np.all(image[9, 3:12, 0] == 255)
    assert np.all(image[2:10, 3, 0] == 255) and np.all(image[2:10, 11, 0] == 255)
    assert np.all(image[5:7, 6:9] == 0)          # interior untouched
    assert np.all(image[12:, :] == 0)            # outside untouched
    assert np.all(image[..., 1:] == 0)


############################################################
#  display_instances
############################################################

def test_display_instances_saves_nonblank_png_with_coloured_masks(tmp_path):
    image, boxes, masks, class_ids = _scene()
    path = tmp_path / "instances.png"
    red = (1.0, 0.0, 0.0)
    before = plt.get_fignums()
    visualize.display_instances(image, boxes, masks, class_ids, CLASS_NAMES,
                                scores=np.array([0.9, 0.8, 0.7]), title="t",
                                figsize=(4, 4), colors=[red] * 3, save_path=str(path))
    # The figure it made was saved and closed (no pile-up under Agg).
    assert plt.get_fignums() == before
    png = (_assert_not_blank(path)[..., :3] * 255).astype(np.int32)
    # Masked pixels are blended with red: 0.5 * 255 + 0.5 * original.
    blended = 0.5 * np.array([255.0, 0.0, 0.0]) + 0.5 * image[masks[..., 0]].mean(axis=0)
    near = np.all(np.abs(png - blended) <= 8, axis=-1)
    assert near.sum() > 50, "no mask-coloured pixels in the saved figure"
    # ... and that colour is not in the original image.
    orig_near = np.all(np.abs(image.astype(int) - blended) <= 8, axis=-1)
    assert orig_near.sum() == 0


def test_display_instances_draws_on_given_axis(tmp_path):
    image, boxes, masks, class_ids = _scene()
    fig, ax = plt.subplots(1, 2, figsize=(6, 3))
    visualize.display_instances(image, boxes, masks, class_ids, CLASS_NAMES, ax=ax[1],
                                show_bbox=False, captions=["a", "b", "c"])
    assert len(ax[1].images) == 1 and len(ax[0].images) == 0
    assert len(ax[1].patches) >= 3          # one contour polygon per mask at least
    assert sorted(t.get_text() for t in ax[1].texts) == ["a", "b", "c"]
    assert plt.get_fignums() == [fig.number]  # no new figure
    shown = ax[1].images[0].get_array()
    assert not np.array_equal(np.asarray(shown), image)  # masks were blended in
    fig.savefig(tmp_path / "axis.png")
    _assert_not_blank(tmp_path / "axis.png")


def test_display_instances_options_and_padding(tmp_path):
    image, boxes, masks, class_ids = _scene()
    # Padding rows (all-zero boxes) are skipped; no masks/boxes shown still draws the image.
    boxes_p = np.concatenate([boxes, np.zeros((1, 4), int)])
    masks_p = np.concatenate([masks, np.zeros(masks.shape[:2] + (1,), bool)], axis=-1)
    ids_p = np.concatenate([class_ids, [0]])
    fig, ax = plt.subplots(1)
    visualize.display_instances(image, boxes_p, masks_p, ids_p, CLASS_NAMES, ax=ax,
                                show_mask=False, show_bbox=True)
    assert len(ax.patches) == 3 and len(ax.texts) == 3
    assert np.array_equal(np.asarray(ax.images[0].get_array()), image)
    # No instances: prints a note, still draws the image.
    visualize.display_instances(image, np.zeros((0, 4)), np.zeros((64, 80, 0), bool),
                                np.zeros((0,), int), CLASS_NAMES,
                                save_path=str(tmp_path / "empty.png"))
    _assert_not_blank(tmp_path / "empty.png")
    # Boxes computed from masks when None.
    visualize.display_instances(image, None, masks, class_ids, CLASS_NAMES,
                                save_path=str(tmp_path / "nobox.png"))
    _assert_not_blank(tmp_path / "nobox.png")


def test_display_instances_without_save_leaves_figure_open_and_never_shows():
    image, boxes, masks, class_ids = _scene()
    visualize.display_instances(image, boxes, masks, class_ids, CLASS_NAMES, figsize=(3, 3))
    # matterport style: the figure stays current so plt.savefig(...) still works afterwards.
    assert len(plt.get_fignums()) == 1
    assert len(plt.gcf().axes[0].images) == 1


def test_interactive_backend_detection(monkeypatch):
    cases = {"agg": False, "Agg": False, "pdf": False, "svg": False,
             "module://matplotlib_inline.backend_inline": True, "QtAgg": True, "TkAgg": True}
    for name, expected in cases.items():
        monkeypatch.setattr(matplotlib, "get_backend", lambda name=name: name)
        assert visualize._interactive_backend() is expected, name


############################################################
#  Other figures
############################################################

def test_display_differences(tmp_path):
    image, boxes, masks, class_ids = _scene()
    pred_boxes = boxes + 1
    pred_masks = np.roll(masks, 1, axis=0)
    pred_ids = np.array([1, 3, 1])
    scores = np.array([0.6, 0.9, 0.95])
    path = tmp_path / "diff.png"
    visualize.display_differences(image, boxes, class_ids, masks,
                                  pred_boxes, pred_ids, scores, pred_masks,
                                  CLASS_NAMES, save_path=str(path))
    _assert_not_blank(path)
    # On a given axis: 3 GT (empty captions) + 3 predictions "class score / iou".
    fig, ax = plt.subplots(1)
    visualize.display_differences(image, boxes, class_ids, masks,
                                  pred_boxes, pred_ids, scores, pred_masks,
                                  CLASS_NAMES, ax=ax)
    captions = [t.get_text() for t in ax.texts if t.get_text()]
    assert len(captions) == 3
    assert captions[0].startswith("shirt 0.95 / ")  # highest score first
    assert any(c.startswith("shoe 0.90") for c in captions)


def test_draw_rois(tmp_path, capsys):
    np.random.seed(0)
    image, boxes, masks, class_ids = _scene()
    rng = np.random.default_rng(1)
    n = 12
    y1 = rng.integers(0, 40, n)
    x1 = rng.integers(0, 50, n)
    rois = np.stack([y1, x1, y1 + rng.integers(5, 20, n), x1 + rng.integers(5, 25, n)], 1)
    refined = rois + rng.integers(-2, 3, size=rois.shape)
    roi_masks = rng.random((n, 28, 28)).astype(np.float32)
    ids = np.array([1, 0, 2, 0, 3, 1, 0, 0, 2, 1, 0, 3])
    path = tmp_path / "rois.png"
    visualize.draw_rois(image, rois, refined, roi_masks, ids, CLASS_NAMES, limit=10,
                        save_path=str(path))
    _assert_not_blank(path)
    out = capsys.readouterr().out
    assert "Positive ROIs:  7" in out and "Negative ROIs:  5" in out
    # No masks, fewer ROIs than the limit.
    visualize.draw_rois(image, rois[:4], refined[:4], None, ids[:4], CLASS_NAMES,
                        save_path=str(tmp_path / "rois2.png"))
    _assert_not_blank(tmp_path / "rois2.png")


def test_draw_boxes(tmp_path):
    image, boxes, masks, class_ids = _scene()
    path = tmp_path / "boxes.png"
    visualize.draw_boxes(image, boxes=boxes, refined_boxes=boxes + 2, masks=masks,
                         captions=["a", "b", "c"], visibilities=[0, 1, 2], title="boxes",
                         save_path=str(path))
    _assert_not_blank(path)
    fig, ax = plt.subplots(1)
    visualize.draw_boxes(image, refined_boxes=boxes, captions=["x", "y", "z"], ax=ax)
    assert len(ax.patches) == 3 and len(ax.images) == 1
    visualize.draw_boxes(image, boxes=boxes, ax=ax)


def test_display_top_masks_and_display_images(tmp_path):
    image, boxes, masks, class_ids = _scene()
    path = tmp_path / "top.png"
    visualize.display_top_masks(image, masks, class_ids, CLASS_NAMES, limit=3,
                                save_path=str(path))
    _assert_not_blank(path)
    visualize.display_top_masks(image, masks, class_ids, CLASS_NAMES)  # no save: stays open
    fig = plt.gcf()
    assert len(fig.axes) == 5
    assert [a.get_title() for a in fig.axes][1:] == ["pants", "shirt", "-", "-"]  # pants 1050 px > shirt ~810

    path = tmp_path / "images.png"
    visualize.display_images([image, masks[..., 0].astype(np.uint8) * 255, image[::2, ::2]],
                             titles=["a", "b", "c"], cols=2, cmap="gray", save_path=str(path))
    _assert_not_blank(path)


def test_plot_precision_recall_and_overlaps(tmp_path):
    path = tmp_path / "pr.png"
    precisions = np.array([1, 1, 0.67, 0.75, 0.6, 0])
    recalls = np.array([0, 0.25, 0.5, 0.75, 0.75, 1])
    visualize.plot_precision_recall(0.62, precisions, recalls, save_path=str(path))
    _assert_not_blank(path)

    gt_ids = np.array([1, 2, 3, 0])         # trailing 0 = padding
    pred_ids = np.array([1, 3, 2])
    scores = np.array([0.9, 0.8, 0.5])
    overlaps = np.array([[0.8, 0.1, 0.0, 0.0],
                         [0.0, 0.0, 0.7, 0.0],
                         [0.0, 0.6, 0.2, 0.0]])
    path = tmp_path / "overlaps.png"
    visualize.plot_overlaps(gt_ids, pred_ids, scores, overlaps, CLASS_NAMES,
                            threshold=0.5, save_path=str(path))
    _assert_not_blank(path)
    visualize.plot_overlaps(gt_ids, pred_ids, scores, overlaps, CLASS_NAMES)
    ax = plt.gcf().axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 9
    assert texts[0] == "0.800\nmatch" and texts[5] == "0.700\nmatch"
    assert texts[1] == "0.100\n"
    assert sum("match" in t for t in texts) == 3
    visualize.plot_overlaps(gt_ids, np.array([1, 3, 1]), scores, overlaps, CLASS_NAMES)
    texts = [t.get_text() for t in plt.gcf().axes[0].texts]
    assert texts[7] == "0.600\nwrong"
    assert [lbl.get_text() for lbl in ax.get_xticklabels()] == ["shirt", "pants", "shoe"]


def test_plot_precision_recall_from_compute_ap(tmp_path):
    from mrcnn import utils
    image, boxes, masks, class_ids = _scene()
    ap, precisions, recalls, overlaps = utils.compute_ap(
        boxes, class_ids, masks, boxes, class_ids, np.array([0.9, 0.8, 0.7]), masks)
    visualize.plot_precision_recall(ap, precisions, recalls, save_path=str(tmp_path / "a.png"))
    _assert_not_blank(tmp_path / "a.png")
    visualize.plot_overlaps(class_ids, class_ids, np.array([0.9, 0.8, 0.7]), overlaps,
                            CLASS_NAMES, save_path=str(tmp_path / "b.png"))
    _assert_not_blank(tmp_path / "b.png")


############################################################
#  Tables and weight statistics
############################################################

def test_display_table_prints_plain_text_outside_ipython(capsys):
    visualize.display_table([["NAME", "VALUE"], ["a", 1], ["long name", 2.5]])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "VALUE"]
    assert set(out[1].replace(" ", "")) == {"-"}
    assert out[3].split() == ["long", "name", "2.5"]
    assert out[2].index("1") == out[3].index("2.5")  # aligned columns
    html = visualize.table_html([["A", "B"], ["<x>", 1]])
    assert html.startswith("<table>") and "<th" in html and "&lt;x&gt;" in html


def _tiny_model():
    import keras
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="conv1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Flatten()(x)
    inner = keras.Sequential([keras.Input((48,)),
                              keras.layers.Dense(4, name="inner_dense"),
                              keras.layers.Dense(2, kernel_initializer="zeros",
                                                 name="dead_dense")],
                             name="rpn_model")
    out = inner(x)
    return keras.Model(inp, out, name="tiny")


def test_display_weight_stats_rows_and_values(capsys):
    model = _tiny_model()
    stats = visualize.compute_weight_stats(model)
    expected = {}
    for layer_name in ("conv1", "bn1"):
        layer = model.get_layer(layer_name)
        for v in layer.weights:
            expected[v.path] = np.asarray(v.numpy())
    inner = model.get_layer("rpn_model")
    for layer in inner.layers:
        for v in layer.weights:
            expected[v.path] = np.asarray(v.numpy())
    assert len(expected) == 2 + 4 + 2 + 2  # conv k/b, bn 4, two dense k/b
    assert {s["name"] for s in stats} == set(expected)
    for s in stats:
        w = expected[s["name"]]
        assert s["shape"] == w.shape
        assert s["min"] == pytest.approx(float(w.min()))
        assert s["max"] == pytest.approx(float(w.max()))
        assert s["std"] == pytest.approx(float(w.std()), abs=1e-7)
    alerts = {s["name"]: s["alerts"] for s in stats}
    dead_kernel = [n for n in alerts if n.endswith("dead_dense/kernel")][0]
    assert alerts[dead_kernel] == ["dead?"]
    assert all(not a for n, a in alerts.items() if n != dead_kernel)  # biases, BN: not flagged

    visualize.display_weight_stats(model)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["WEIGHT", "NAME", "SHAPE", "MIN", "MAX", "STD"]
    rows = out[2:]
    assert len(rows) == len(expected)
    for name, w in expected.items():
        row = [r for r in rows if r.split()[0] == name]
        assert len(row) == 1, name
        assert "{:+9.4f}".format(w.min()).strip() in row[0]
        assert "{:+10.4f}".format(w.max()).strip() in row[0]
        assert ("*** dead?" in row[0]) == (name == dead_kernel)

    # A MaskRCNN-like wrapper: its keras_model is used.
    visualize.display_weight_stats(types.SimpleNamespace(keras_model=model))
    assert len(capsys.readouterr().out.splitlines()) == len(out)


def test_weight_stats_flags_overflow_and_nan():
    import keras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    k, b = model.get_layer("d").get_weights()
    k[0, 0] = 5000.0
    b[0] = np.nan
    model.get_layer("d").set_weights([k, b])
    alerts = {s["name"].split("/")[-1]: s["alerts"] for s in visualize.compute_weight_stats(model)}
    assert "overflow?" in alerts["kernel"]
    assert "nan/inf" in alerts["bias"]
