"""Drawing helpers for Mask R-CNN: images, instances, ROIs, PR curves, overlaps, weight tables.

The functions and signatures are matterport's (`from mrcnn import visualize`), so notebooks
written for matterport run unchanged. Additions, all optional keywords:

- `save_path=None` on every function that draws a figure: write the figure to that file (any
  format matplotlib knows from the extension). When the figure was created by the function and
  the backend is non-interactive (Agg), the figure is closed after saving, so loops do not pile
  up open figures.
- `plt.show()` is only called on interactive backends (Jupyter inline, Qt, Tk, ...); under Agg
  (scripts, CI, servers without a display) nothing blocks and nothing warns.
- `display_table` renders HTML inside a Jupyter kernel and prints a plain-text table anywhere
  else; `compute_weight_stats(model)` returns the numbers `display_weight_stats` shows.

Conventions: boxes are (y1, x1, y2, x2) in pixels; masks are [H, W, N] (bool or 0/1); colours
are RGB tuples in [0, 1]; images are RGB [H, W, 3] in 0..255.
"""

import colorsys
import itertools
import random

import numpy as np
import matplotlib
import matplotlib.pyplot as plt
from matplotlib import lines, patches
from matplotlib.patches import Polygon
from skimage.measure import find_contours


############################################################
#  Figure plumbing
############################################################

_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def _interactive_backend():
    """True when plt.show() would display something (Jupyter inline, Qt, Tk, macosx, ...)."""
    backend = str(matplotlib.get_backend()).lower()
    if backend.startswith("module://"):
        # Third-party backends: the Jupyter inline one and widget backends show figures.
        return "inline" in backend or "ipympl" in backend or "widget" in backend
    return backend not in _NON_INTERACTIVE


def _finish(fig, save_path=None, created=True, show=False):
    """Save the figure if asked, show it on an interactive backend, never block under Agg.

    created: the function made `fig` itself (so it may close it).
    show: matterport called plt.show() in this function.
    """
    if save_path is not None:
        fig.savefig(save_path, bbox_inches="tight")
    if not created:
        return
    if _interactive_backend():
        if show:
            plt.show()
    elif save_path is not None:
        plt.close(fig)


def _in_notebook():
    """True inside a Jupyter kernel (where HTML display works), False in scripts and terminals."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _to_rgb_uint8(image):
    """Clip an image to 0..255 and return uint8 for imshow."""
    return np.clip(np.asarray(image), 0, 255).astype(np.uint8)


def _draw_mask_outline(ax, mask, color):
    """Outline each connected region of a 2-D mask with a polygon (skimage find_contours).

    The mask is padded by one pixel so regions touching the border still close.
    """
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    for verts in find_contours(padded, 0.5):
        # (row, col) -> (x, y), undo the padding.
        verts = np.fliplr(verts) - 1
        ax.add_patch(Polygon(verts, facecolor="none", edgecolor=color))


def _prepare_axis(ax, height, width, margin, title):
    ax.set_ylim(height + margin, -margin)
    ax.set_xlim(-margin, width + margin)
    ax.axis("off")
    ax.set_title(title)


############################################################
#  Images and colours
############################################################

def display_images(images, titles=None, cols=4, cmap=None, norm=None,
                   interpolation=None, save_path=None):
    """Show a list of images in a grid.

    images: list or array of images ([H, W, 3] RGB or [H, W] single channel).
    titles: optional list of titles, one per image.
    cols: number of images per row.
    cmap: colour map for single-channel images, e.g. "gray" or "Blues_r".
    norm, interpolation: passed to imshow.
    save_path: optional file to write the figure to.
    """
    images = list(images)
    titles = list(titles) if titles is not None else [""] * len(images)
    cols = max(1, int(cols))
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig = plt.figure(figsize=(14, max(14 * rows / cols, 3)))
    for i, (image, title) in enumerate(zip(images, titles), start=1):
        ax = fig.add_subplot(rows, cols, i)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        ax.imshow(np.asarray(image).astype(np.uint8), cmap=cmap, norm=norm,
                  interpolation=interpolation)
    _finish(fig, save_path, show=True)


def random_colors(N, bright=True, seed=None):
    """N visually distinct RGB colours in [0, 1], in random order.

    Evenly spaced hues in HSV, converted to RGB, then shuffled. bright=False gives darker
    colours (value 0.7). seed: optional int for a reproducible order.
    """
    N = int(N)
    if N <= 0:
        return []
    brightness = 1.0 if bright else 0.7
    colors = [colorsys.hsv_to_rgb(i / N, 1.0, brightness) for i in range(N)]
    rng = random.Random(seed) if seed is not None else random
    rng.shuffle(colors)
    return colors


def apply_mask(image, mask, color, alpha=0.5):
    """Blend `color` into `image` where `mask` is set, in place; returns the image.

    image: [H, W, 3]; mask: [H, W] bool or 0/1; color: RGB in [0, 1]; alpha: opacity.
    Where the mask is set: alpha * color * 255 + (1 - alpha) * image; elsewhere unchanged.
    Use a float or wide integer image (display_instances uses float32) to avoid rounding.
    """
    where = np.asarray(mask) == 1
    for c in range(3):
        channel = image[:, :, c]
        channel[where] = channel[where] * (1 - alpha) + alpha * color[c] * 255
    return image


############################################################
#  Instances
############################################################

def display_instances(image, boxes, masks, class_ids, class_names,
                      scores=None, title="",
                      figsize=(16, 16), ax=None,
                      show_mask=True, show_bbox=True,
                      colors=None, captions=None, save_path=None):
    """Draw instances (boxes, masks, captions) on an image.

    image: [H, W, 3] RGB.
    boxes: [N, (y1, x1, y2, x2)] pixels; all-zero rows (padding) are skipped. None: computed
        from the masks.
    masks: [H, W, N] bool or 0/1 (None when show_mask is False and boxes are given).
    class_ids: [N] ints indexing class_names.
    scores: optional [N] confidences shown after the class name.
    title: axis title. figsize: size of a new figure (when ax is None).
    ax: draw on this matplotlib axis instead of a new figure (then nothing is shown).
    show_mask, show_bbox: draw masks / boxes.
    colors: optional list of N RGB colours (default: random_colors(N)).
    captions: optional list of N strings replacing "class score".
    save_path: optional file (e.g. "out.png") to write the figure to; works headless.
    Returns nothing (as matterport).
    """
    if boxes is None:
        from mrcnn import utils
        boxes = utils.extract_bboxes(np.asarray(masks))
    boxes = np.asarray(boxes).reshape(-1, 4)
    N = boxes.shape[0]
    class_ids = np.asarray(class_ids).reshape(-1)
    if not N:
        print("\n*** No instances to display *** \n")
    else:
        assert class_ids.shape[0] == N, \
            "display_instances: %d boxes but %d class_ids" % (N, class_ids.shape[0])
        if masks is not None:
            assert np.asarray(masks).shape[-1] == N, \
                "display_instances: %d boxes but masks of shape %s" % (N, np.shape(masks))

    created = ax is None
    if created:
        fig, ax = plt.subplots(1, figsize=figsize)
    else:
        fig = ax.figure

    colors = random_colors(N) if colors is None else colors
    height, width = image.shape[:2]
    _prepare_axis(ax, height, width, 10, title)

    masked_image = np.asarray(image, dtype=np.float32).copy()
    if masked_image.ndim == 2:
        masked_image = np.stack([masked_image] * 3, axis=-1)
    for i in range(N):
        color = colors[i]
        if not np.any(boxes[i]):
            continue  # padding
        y1, x1, y2, x2 = boxes[i]
        if show_bbox:
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=2, alpha=0.7,
                                           linestyle="dashed", edgecolor=color,
                                           facecolor="none"))
        if captions is None:
            class_id = int(class_ids[i])
            label = class_names[class_id]
            score = scores[i] if scores is not None else None
            caption = "{} {:.3f}".format(label, score) if score is not None else label
        else:
            caption = captions[i]
        ax.text(x1, y1 + 8, caption, color="w", size=11, backgroundcolor="none")

        if masks is not None and show_mask:
            mask = np.asarray(masks[:, :, i])
            masked_image = apply_mask(masked_image, mask, color)
            _draw_mask_outline(ax, mask, color)
    ax.imshow(_to_rgb_uint8(masked_image))
    _finish(fig, save_path, created=created, show=True)


def display_differences(image,
                        gt_box, gt_class_id, gt_mask,
                        pred_box, pred_class_id, pred_score, pred_mask,
                        class_names, title="", ax=None,
                        show_mask=True, show_box=True,
                        iou_threshold=0.5, score_threshold=0.5, save_path=None):
    """Show ground truth (green) and predictions (red) on one image.

    Predictions are captioned "class score / IoU" with the IoU of their match (or their best
    overlap when unmatched). Matching is utils.compute_matches with the given thresholds.
    """
    from mrcnn import utils
    gt_match, pred_match, overlaps = utils.compute_matches(
        gt_box, gt_class_id, gt_mask,
        pred_box, pred_class_id, pred_score, pred_mask,
        iou_threshold=iou_threshold, score_threshold=score_threshold)
    # compute_matches sorts predictions by score; use the same order here.
    pred_box = utils.trim_zeros(np.asarray(pred_box).reshape(-1, 4))
    gt_box = utils.trim_zeros(np.asarray(gt_box).reshape(-1, 4))
    order = np.argsort(-np.asarray(pred_score)[:len(pred_box)], kind="stable")
    pred_box = pred_box[order]
    pred_class_id = np.asarray(pred_class_id)[order]
    pred_score = np.asarray(pred_score)[order]
    pred_mask = np.asarray(pred_mask)[..., order]
    gt_class_id = np.asarray(gt_class_id)[:len(gt_box)]
    gt_mask = np.asarray(gt_mask)[..., :len(gt_box)]

    colors = [(0, 1, 0, .8)] * len(gt_match) + [(1, 0, 0, 1)] * len(pred_match)
    class_ids = np.concatenate([gt_class_id, pred_class_id])
    scores = np.concatenate([np.zeros([len(gt_match)]), pred_score])
    boxes = np.concatenate([gt_box, pred_box])
    masks = np.concatenate([gt_mask, pred_mask], axis=-1)
    captions = [""] * len(gt_match)
    for i in range(len(pred_match)):
        if pred_match[i] > -1:
            iou = overlaps[i, int(pred_match[i])]
        else:
            iou = overlaps[i].max() if overlaps.shape[1] else 0.0
        captions.append("{} {:.2f} / {:.2f}".format(
            class_names[int(pred_class_id[i])], pred_score[i], iou))
    title = title or "Ground Truth and Detections\n GT=green, pred=red, captions: score/IoU"
    display_instances(image, boxes, masks, class_ids, class_names, scores, ax=ax,
                      show_bbox=show_box, show_mask=show_mask, colors=colors,
                      captions=captions, title=title, save_path=save_path)


def draw_rois(image, rois, refined_rois, mask, class_ids, class_names, limit=10,
              save_path=None):
    """Draw ROIs, their refined boxes and masks (a random sample of `limit` of them).

    rois: [N, (y1, x1, y2, x2)] pixels; refined_rois: [N, 4] the same ROIs after box refinement;
    mask: [N, h, w] per-ROI mask (e.g. the 28x28 mask of the ROI's class), or None;
    class_ids: [N], 0 = background (drawn as a grey dotted box, no refinement, no mask).
    Prints the number of positive and negative ROIs.
    """
    rois = np.asarray(rois).reshape(-1, 4)
    class_ids = np.asarray(class_ids).reshape(-1)
    masked_image = np.asarray(image, dtype=np.float32).copy()

    ids = np.arange(rois.shape[0], dtype=np.int32)
    if rois.shape[0] > limit:
        ids = np.random.choice(ids, limit, replace=False)

    fig, ax = plt.subplots(1, figsize=(12, 12))
    if rois.shape[0] > limit:
        title = "Showing {} random ROIs out of {}".format(len(ids), rois.shape[0])
    else:
        title = "{} ROIs".format(len(ids))
    _prepare_axis(ax, image.shape[0], image.shape[1], 20, title)

    for i, roi_id in enumerate(ids):
        color = np.random.rand(3)
        class_id = int(class_ids[roi_id])
        y1, x1, y2, x2 = rois[roi_id]
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=2,
                                       edgecolor=color if class_id else "gray",
                                       facecolor="none",
                                       linestyle="dashed" if class_id else "dotted"))
        if not class_id:
            continue
        ry1, rx1, ry2, rx2 = refined_rois[roi_id]
        ax.add_patch(patches.Rectangle((rx1, ry1), rx2 - rx1, ry2 - ry1, linewidth=2,
                                       edgecolor=color, facecolor="none"))
        # Connect the top-left corners of the ROI and its refinement.
        ax.add_line(lines.Line2D([x1, rx1], [y1, ry1], color=color))
        ax.text(rx1, ry1 + 8, "{}".format(class_names[class_id]),
                color="w", size=11, backgroundcolor="none")
        if mask is not None:
            from mrcnn import utils
            m = utils.unmold_mask(np.asarray(mask[roi_id]), rois[roi_id][:4].astype(np.int32),
                                  image.shape)
            masked_image = apply_mask(masked_image, m, color)

    ax.imshow(_to_rgb_uint8(masked_image))
    positive = int(np.sum(class_ids > 0))
    print("Positive ROIs: ", positive)
    print("Negative ROIs: ", int(np.sum(class_ids == 0)))
    print("Positive Ratio: {:.2f}".format(positive / max(1, class_ids.shape[0])))
    _finish(fig, save_path)


def draw_box(image, box, color):
    """Draw a 2-pixel-wide box outline into an image array, in place; returns the image.

    box: (y1, x1, y2, x2) pixels; color: a value per channel (e.g. (255, 0, 0) or a scalar).
    """
    y1, x1, y2, x2 = [int(v) for v in box[:4]]
    image[y1:y1 + 2, x1:x2] = color
    image[max(y2 - 2, 0):y2, x1:x2] = color
    image[y1:y2, x1:x1 + 2] = color
    image[y1:y2, max(x2 - 2, 0):x2] = color
    return image


def display_top_masks(image, mask, class_ids, class_names, limit=4, save_path=None):
    """Show the image and, for the `limit` classes with the largest total mask area, all the
    instances of that class in one panel."""
    mask = np.asarray(mask)
    class_ids = np.asarray(class_ids).reshape(-1)
    to_display = [image]
    titles = ["H x W={}x{}".format(image.shape[0], image.shape[1])]
    unique_class_ids = np.unique(class_ids)
    areas = [np.sum(mask[:, :, np.where(class_ids == c)[0]]) for c in unique_class_ids]
    ranked = sorted(zip(unique_class_ids, areas), key=lambda t: t[1], reverse=True)
    top_ids = [c for c, area in ranked if area > 0]
    for i in range(limit):
        class_id = top_ids[i] if i < len(top_ids) else -1
        if class_id == -1:
            m = np.zeros(mask.shape[:2])
        else:
            m = mask[:, :, np.where(class_ids == class_id)[0]].astype(np.float32)
            # Number the instances 1..k so each shows in its own shade.
            m = np.sum(m * np.arange(1, m.shape[-1] + 1), axis=-1)
        to_display.append(m)
        titles.append(class_names[class_id] if class_id != -1 else "-")
    display_images(to_display, titles=titles, cols=limit + 1, cmap="Blues_r",
                   save_path=save_path)


############################################################
#  Evaluation plots
############################################################

def plot_precision_recall(AP, precisions, recalls, save_path=None):
    """Plot the precision-recall curve (as returned by utils.compute_ap).

    AP: average precision at IoU >= 0.5; precisions, recalls: lists of equal length.
    """
    fig, ax = plt.subplots(1)
    ax.set_title("Precision-Recall Curve. AP@50 = {:.3f}".format(AP))
    ax.set_ylim(0, 1.1)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.plot(recalls, precisions)
    _finish(fig, save_path)


def plot_overlaps(gt_class_ids, pred_class_ids, pred_scores,
                  overlaps, class_names, threshold=0.5, save_path=None):
    """Draw the IoU grid of predictions (rows) against ground truth (columns).

    gt_class_ids: [G]; pred_class_ids, pred_scores: [P]; overlaps: [P, G] IoUs;
    class_ids of 0 (padding) are dropped. Cells above `threshold` are labelled "match" when the
    classes agree and "wrong" otherwise.
    """
    gt_class_ids = np.asarray(gt_class_ids).reshape(-1)
    pred_class_ids = np.asarray(pred_class_ids).reshape(-1)
    pred_scores = np.asarray(pred_scores).reshape(-1)
    gt_keep = gt_class_ids != 0
    pred_keep = pred_class_ids != 0
    gt_class_ids = gt_class_ids[gt_keep]
    pred_class_ids = pred_class_ids[pred_keep]
    pred_scores = pred_scores[pred_keep]
    overlaps = np.asarray(overlaps)[:len(pred_keep), :len(gt_keep)]
    overlaps = overlaps[pred_keep][:, gt_keep]

    fig = plt.figure(figsize=(12, 10))
    ax = fig.add_subplot(1, 1, 1)
    if overlaps.size:
        ax.imshow(overlaps, cmap=plt.cm.Blues, vmin=0, vmax=1)
    ax.set_yticks(np.arange(len(pred_class_ids)))
    ax.set_yticklabels(["{} ({:.2f})".format(class_names[int(c)], pred_scores[i])
                        for i, c in enumerate(pred_class_ids)])
    ax.set_xticks(np.arange(len(gt_class_ids)))
    ax.set_xticklabels([class_names[int(c)] for c in gt_class_ids], rotation=90)

    half = overlaps.max() / 2.0 if overlaps.size else 0.5
    for i, j in itertools.product(range(overlaps.shape[0]), range(overlaps.shape[1])):
        verdict = ""
        if overlaps[i, j] > threshold:
            verdict = "match" if gt_class_ids[j] == pred_class_ids[i] else "wrong"
        color = "white" if overlaps[i, j] > half else "black"
        if verdict == "wrong":
            color = "red"
        ax.text(j, i, "{:.3f}\n{}".format(overlaps[i, j], verdict),
                horizontalalignment="center", verticalalignment="center",
                fontsize=9, color=color)
    fig.tight_layout()
    ax.set_xlabel("Ground Truth")
    ax.set_ylabel("Predictions")
    _finish(fig, save_path)


def draw_boxes(image, boxes=None, refined_boxes=None,
               masks=None, captions=None, visibilities=None,
               title="", ax=None, save_path=None):
    """Draw boxes (and optionally their refinements, masks and captions) on an image.

    boxes: [N, (y1, x1, y2, x2)] pixels, drawn dotted. refined_boxes: [N, 4] drawn solid and
    joined to their box by a line. masks: [H, W, N]. captions: N strings.
    visibilities: N values in {0, 1, 2}: 0 grey and faint, 1 normal, 2 emphasised (default 1).
    title, ax: as display_instances. save_path: optional output file.
    """
    assert boxes is not None or refined_boxes is not None, "draw_boxes needs boxes"
    boxes = None if boxes is None else np.asarray(boxes).reshape(-1, 4)
    refined_boxes = None if refined_boxes is None else np.asarray(refined_boxes).reshape(-1, 4)
    N = (boxes if boxes is not None else refined_boxes).shape[0]

    created = ax is None
    if created:
        fig, ax = plt.subplots(1, figsize=(12, 12))
    else:
        fig = ax.figure
    colors = random_colors(N)
    margin = image.shape[0] // 10
    _prepare_axis(ax, image.shape[0], image.shape[1], margin, title)

    masked_image = np.asarray(image, dtype=np.float32).copy()
    for i in range(N):
        visibility = visibilities[i] if visibilities is not None else 1
        if visibility == 0:
            color, style, alpha = "gray", "dotted", 0.5
        elif visibility == 1:
            color, style, alpha = colors[i], "dotted", 1
        else:
            color, style, alpha = colors[i], "solid", 1

        if boxes is not None:
            if not np.any(boxes[i]):
                continue  # padding
            y1, x1, y2, x2 = boxes[i]
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1,
                                           linewidth=2 if visibility == 2 else 1,
                                           alpha=alpha, linestyle=style,
                                           edgecolor=color, facecolor="none"))
        if refined_boxes is not None:
            ry1, rx1, ry2, rx2 = refined_boxes[i]
        if refined_boxes is not None and visibility > 0:
            ax.add_patch(patches.Rectangle((rx1, ry1), rx2 - rx1, ry2 - ry1, linewidth=2,
                                           edgecolor=color, facecolor="none"))
            if boxes is not None:
                ax.add_line(lines.Line2D([x1, rx1], [y1, ry1], color=color))
        if captions is not None:
            caption = captions[i]
            # Caption at the top-left of the refined box when there is one.
            if refined_boxes is not None:
                y1, x1, y2, x2 = ry1, rx1, ry2, rx2
            ax.text(x1, y1, caption, size=11, verticalalignment="top", color="w",
                    backgroundcolor="none",
                    bbox={"facecolor": color, "alpha": 0.5, "pad": 2, "edgecolor": "none"})
        if masks is not None:
            mask = np.asarray(masks[:, :, i])
            masked_image = apply_mask(masked_image, mask, color if visibility else (.5, .5, .5))
            _draw_mask_outline(ax, mask, color)
    ax.imshow(_to_rgb_uint8(masked_image))
    _finish(fig, save_path, created=created)


############################################################
#  Tables
############################################################

def format_table(table):
    """A list of rows (lists of str/values; the first row is the header) as aligned plain text."""
    rows = [[str(cell) for cell in row] for row in table]
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    rows = [r + [""] * (ncols - len(r)) for r in rows]
    widths = [max(len(r[c]) for r in rows) for c in range(ncols)]
    lines_ = []
    for k, row in enumerate(rows):
        lines_.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0 and len(rows) > 1:
            lines_.append("  ".join("-" * w for w in widths))
    return "\n".join(lines_)


def table_html(table):
    """A list of rows (first row: header) as an HTML <table> string."""
    import html
    out = []
    for k, row in enumerate(table):
        tag = "th" if k == 0 else "td"
        cells = "".join("<{0} style='text-align:left'>{1}</{0}>".format(tag, html.escape(str(c)))
                        for c in row)
        out.append("<tr>" + cells + "</tr>")
    return "<table>" + "".join(out) + "</table>"


def display_table(table):
    """Display a table: HTML inside a Jupyter kernel, a printed plain-text table elsewhere.

    table: list of rows, each a list of values; the first row is the header.
    """
    if _in_notebook():
        from IPython.display import HTML, display
        display(HTML(table_html(table)))
    else:
        print(format_table(table))


def _iter_layers(model, seen=None):
    """All non-container layers of a Keras model, descending into nested models (rpn_model...)."""
    if seen is None:
        seen = set()
    for layer in getattr(model, "layers", []):
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if getattr(layer, "layers", None):  # a nested Model / Functional / Sequential
            yield from _iter_layers(layer, seen)
        else:
            yield layer


# Weights that are legitimately constant in a freshly initialised model.
_CONSTANT_OK = ("bias", "beta", "gamma", "moving_mean", "moving_variance")


def compute_weight_stats(model):
    """Statistics of every weight of a Keras model (nested models included).

    model: a keras.Model, or a MaskRCNN wrapper (its .keras_model is used).
    Returns a list of dicts with keys: name (the variable path, e.g. "conv1/kernel"), layer,
    shape, min, max, mean, std, alerts (list of str: "dead?" for a constant kernel-like weight,
    "overflow?" for |w| > 1000, "nan/inf" for non-finite values).
    """
    model = getattr(model, "keras_model", model)
    stats = []
    seen = set()
    for layer in _iter_layers(model):
        for var in layer.weights:
            if id(var) in seen:
                continue
            seen.add(id(var))
            w = np.asarray(var.numpy() if hasattr(var, "numpy") else var, dtype=np.float64)
            name = getattr(var, "path", None) or var.name
            short = name.rsplit("/", 1)[-1]
            alerts = []
            finite = w[np.isfinite(w)]
            if finite.size < w.size:
                alerts.append("nan/inf")
            if w.size:
                wmin, wmax = float(np.min(w)), float(np.max(w))
                mean, std = float(np.mean(w)), float(np.std(w))
            else:
                wmin = wmax = mean = std = float("nan")
            if finite.size and not short.startswith(_CONSTANT_OK) and w.size > 1:
                if finite.max() - finite.min() <= 1e-12 * max(1.0, abs(finite.max())):
                    alerts.append("dead?")
            if finite.size and (abs(finite.min()) > 1000 or abs(finite.max()) > 1000):
                alerts.append("overflow?")
            stats.append({"name": name, "layer": layer.name, "shape": tuple(w.shape),
                          "min": wmin, "max": wmax, "mean": mean, "std": std,
                          "alerts": alerts})
    return stats


def display_weight_stats(model):
    """Show a table of weight name, shape, min, max and std for every weight of the model.

    Suspicious weights are flagged after the name: "*** dead?" (constant kernel, e.g. all
    zeros: not trained or not loaded), "*** overflow?" (|w| > 1000), "*** nan/inf".
    Works in Jupyter (HTML) and in plain Python (printed text).
    """
    table = [["WEIGHT NAME", "SHAPE", "MIN", "MAX", "STD"]]
    for s in compute_weight_stats(model):
        name = s["name"] + "".join("  *** " + a for a in s["alerts"])
        table.append([name, str(s["shape"]),
                      "{:+9.4f}".format(s["min"]), "{:+10.4f}".format(s["max"]),
                      "{:+9.4f}".format(s["std"])])
    display_table(table)
