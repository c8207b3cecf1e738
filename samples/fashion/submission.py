"""Detection output and the Kaggle submission of the fashion sample.

    rows = submission_rows("0a1b.jpg", model.detect([image])[0], mask_size=512)
    write_submission("submission.csv", test_dataset, detect, mask_size=512)

iMaterialist 2019's submission lists, for every test image, one row per instance:
ImageId, EncodedPixels (Kaggle RLE: 1-indexed, column-major, of a mask at mask_size x
mask_size or at the image's size) and ClassId (the category, class id - 1). Masks of one image
must not overlap: each pixel goes to the highest-scoring mask. An image without detections
gets one row with empty EncodedPixels and ClassId, so that it is listed. With attributes
(`submit --attributes`, a model with an attribute head: detections carrying `attributes`),
ClassId is iMaterialist's "category_attr_attr": the category, then the sorted attribute ids
("6_28_71"; a detection without attributes keeps "6").

`detect` (fashion.py detect) writes one CSV row per detection with its box, score, class
name and attribute ids, and a picture of the detections per image (with the attributes'
names under the class when the detections have them). Every CSV is written atomically
(mrcnn.checkpoints.atomic_open): an interrupted run leaves the previous file, never half a
file.
"""

import csv
import os
import sys

import numpy as np

from mrcnn import utils
from mrcnn.checkpoints import atomic_open
# Each pixel to the highest-scoring mask: one definition, shared with threshold tuning.
from mrcnn.tuning import non_overlapping

SUBMISSION_COLUMNS = ["ImageId", "EncodedPixels", "ClassId"]
DETECTION_COLUMNS = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "ClassName",
                     "Score", "y1", "x1", "y2", "x2", "Attributes"]


############################################################
#  Masks to rows
############################################################

def resize_masks(masks, size):
    """Resize bool masks [H, W, N] to size x size (bilinear, >= 0.5); size 0 keeps them."""
    if not size or masks.shape[-1] == 0:
        if size and masks.shape[-1] == 0:
            return np.zeros((size, size, 0), bool)
        return masks
    import cv2
    out = np.zeros((size, size, masks.shape[-1]), bool)
    for k in range(masks.shape[-1]):
        out[..., k] = cv2.resize(masks[..., k].astype(np.float32), (size, size),
                                 interpolation=cv2.INTER_LINEAR) >= 0.5
    return out


def attribute_ids(result, k):
    """The sorted attribute ids of detection k of a detect() result ([] without attributes)."""
    attributes = result.get("attributes")
    if attributes is None:
        return []
    if len(attributes) != len(result["class_ids"]):
        raise ValueError("detections: %d attribute sets for %d detections"
                         % (len(attributes), len(result["class_ids"])))
    return sorted({int(a) for a in np.asarray(attributes[k]).reshape(-1)})


def class_id_string(class_id, attributes=()):
    """iMaterialist's ClassId of a class id (category class id - 1) and attribute ids:
    "6", or "6_28_71" (attribute ids sorted)."""
    return "_".join([str(int(class_id) - 1)] + [str(a) for a in sorted(int(a) for a in attributes)])


def submission_rows(image_name, result, mask_size=512, attributes=False):
    """Rows (ImageId, EncodedPixels, ClassId) of one image's detections.

    Masks are resized to mask_size x mask_size (0: the image's size), then made
    non-overlapping (each pixel goes to the highest-scoring mask) and RLE-encoded; masks left
    empty are dropped. ClassId is the iMaterialist category (class id - 1), followed with
    `attributes` by the detection's sorted attribute ids ("6_28_71"; result["attributes"],
    none when the result has no attributes). An image without detections gets one row with
    empty EncodedPixels and ClassId, so that it is listed.
    """
    masks = resize_masks(np.asarray(result["masks"], bool), mask_size)
    masks = non_overlapping(masks, result["scores"])
    rows = []
    for k, class_id in enumerate(np.asarray(result["class_ids"]).reshape(-1)):
        if masks[..., k].any():
            rows.append((image_name, utils.rle_encode(masks[..., k]),
                         class_id_string(class_id, attribute_ids(result, k) if attributes
                                         else ())))
    if not rows:
        rows.append((image_name, "", ""))
    return rows


def detection_rows(image_name, result, class_names):
    """Rows of DETECTION_COLUMNS for one image's detections at the image's size (masks that
    are empty at that size, a box without pixels, have no RLE and are left out). Attributes:
    the detection's sorted attribute ids joined by "_" (empty without)."""
    masks = np.asarray(result["masks"], bool)
    h, w = masks.shape[:2]
    rows = []
    for k, class_id in enumerate(result["class_ids"]):
        if not masks[..., k].any():
            continue
        rows.append([image_name, utils.rle_encode(masks[..., k]), h, w, int(class_id) - 1,
                     class_names[class_id], "%.4f" % result["scores"][k]]
                    + [int(v) for v in result["rois"][k]]
                    + ["_".join(str(a) for a in attribute_ids(result, k))])
    return rows


############################################################
#  CSV files
############################################################

def write_submission(path, dataset, detect, mask_size=512, progress=iter, attributes=False):
    """Write the submission CSV of every image of `dataset` (a prepared FashionDataset of the
    test subset) to `path`, atomically.

    detect: image -> result dict of MaskRCNN.detect (boxes, masks, class ids, scores).
    attributes: ClassIds with the detections' attribute ids ("6_28_71", submission_rows).
    An image that cannot be read is listed without detections (with a warning naming it).
    progress: wraps the image ids (e.g. a progress bar). Returns the number of rows written.
    """
    n_rows = 0
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUBMISSION_COLUMNS)
        for image_id in progress(dataset.image_ids):
            name = dataset.image_info[image_id]["id"]
            try:
                image = dataset.load_image(image_id)
            except utils.ImageLoadError as e:
                print("warning: %s; listed without detections" % e, file=sys.stderr)
                writer.writerow([name, "", ""])
                n_rows += 1
                continue
            rows = submission_rows(name, detect(image), mask_size, attributes=attributes)
            writer.writerows(rows)
            n_rows += len(rows)
    return n_rows


def write_detections(output, paths, detect, class_names, progress=iter, attribute_names=None):
    """Detect on each image file of `paths`: draw its detections to
    <output>/<name>_detections.png and write every mask as RLE to <output>/detections.csv
    (DETECTION_COLUMNS, atomically). Prints one line per image. Returns the CSV's path.
    attribute_names: {attribute id: name} drawn under the class of detections with
    attributes."""
    os.makedirs(output, exist_ok=True)
    csv_path = os.path.join(output, "detections.csv")
    with atomic_open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DETECTION_COLUMNS)
        for path in progress(paths):
            image, _ = utils.read_image(path)
            result = detect(image)
            name = os.path.basename(path)
            out_png = os.path.join(output, os.path.splitext(name)[0] + "_detections.png")
            draw_detections(image, result, class_names, out_png, attribute_names)
            writer.writerows(detection_rows(name, result, class_names))
            print("%s: %d instance(s) -> %s" % (name, len(result["class_ids"]), out_png))
    return csv_path


def image_paths(path):
    """The image files of a folder (sorted; .jpg .jpeg .png .bmp) or [path] for a file.
    Raises FileNotFoundError naming a path that does not exist."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path)
                       if n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp")))
        return [os.path.join(path, n) for n in names]
    if not os.path.isfile(path):
        raise FileNotFoundError("image not found: %s" % path)
    return [path]


def detection_captions(result, class_names, attribute_names=None):
    """One caption per detection: "class score", then when the detection has attributes a
    line with their names (attribute_names {id: name}; the id when it has no name)."""
    names = attribute_names or {}
    captions = []
    for k, class_id in enumerate(np.asarray(result["class_ids"]).reshape(-1)):
        caption = "%s %.2f" % (class_names[class_id], float(result["scores"][k]))
        ids = attribute_ids(result, k)
        if ids:
            caption += "\n" + ", ".join(str(names.get(a, a)) for a in ids)
        captions.append(caption)
    return captions


def draw_detections(image, result, class_names, path, attribute_names=None):
    """Write the image with masks, boxes, class names and scores drawn (PNG/JPEG by suffix),
    and the names of the detections' attributes (attribute_names {id: name}) when they have
    some."""
    captions = detection_captions(result, class_names, attribute_names)
    try:
        from mrcnn import visualize
        display = visualize.display_instances
    except ImportError:
        display = None
    if display is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        h, w = image.shape[:2]
        fig, ax = plt.subplots(1, figsize=(max(4, w / 100), max(4, h / 100)))
        display(image, result["rois"], result["masks"], result["class_ids"], class_names,
                result["scores"], ax=ax, captions=captions)
        fig.savefig(path, bbox_inches="tight", dpi=100)
        plt.close(fig)
        return path
    import cv2
    canvas = image.copy()
    rng = np.random.default_rng(0)
    for k in range(result["masks"].shape[-1]):
        colour = rng.integers(60, 255, 3)
        m = result["masks"][..., k]
        canvas[m] = (0.5 * canvas[m] + 0.5 * colour).astype(np.uint8)
        y1, x1, y2, x2 = [int(v) for v in result["rois"][k]]
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour.tolist(), 1)
        for i, label in enumerate(captions[k].split("\n")):
            cv2.putText(canvas, label, (x1, max(10, y1 - 3) + 12 * i), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, colour.tolist(), 1)
    cv2.imwrite(path, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return path
