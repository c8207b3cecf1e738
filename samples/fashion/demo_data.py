"""A small synthetic dataset in iMaterialist (Fashion) 2019's file format, for the demo and tests.

`ensure_demo_data()` generates it deterministically (from a seed) on first use and returns its
folder, which then looks exactly like the Kaggle download:

    train.csv                 ImageId, EncodedPixels, Height, Width, ClassId (one row per mask;
                              some ClassIds carry attributes, e.g. "10_0_2")
    label_descriptions.json   the real 46 categories (names, supercategories, levels) and 92
                              attribute entries (the demo's three named, the others
                              placeholders: see its "info")
    train/<ImageId>           JPEGs of 256-384 px
    test/<ImageId>            JPEGs without annotations
    sample_submission.csv     ImageId, EncodedPixels, ClassId

The images show garment-like shapes of six categories (top, pants, skirt, dress, shoe, bag),
overlapping as outfits do, on textured backgrounds. Each category has its own colour family and
texture so that a small Mask R-CNN learns them in a few minutes on a CPU. Masks are the visible
parts (later shapes occlude earlier ones), encoded exactly as Kaggle's EncodedPixels.

Attributes (DEMO_ATTRIBUTES) each have a visible cue, drawn on some garments of the categories
that may carry them (ATTRIBUTE_CATEGORIES), so that an attribute head can learn them: 0 "hem
band" (a light band across the garment's lower part), 1 "pinstripes" (thin dark vertical
stripes), 2 "edge trim" (a dark outline along the garment's edge). Each applies independently
with probability ATTRIBUTE_PROBABILITY; the ClassId lists those drawn ("10_0_2").
"""

import hashlib
import json
import os
import shutil
import tempfile

import cv2
import numpy as np

from mrcnn import utils

# Bump when the generator changes: an existing folder of another version is regenerated.
DEMO_VERSION = 4

DEFAULT_SEED = 2019
DEFAULT_TRAIN_IMAGES = 80      # the fashion sample splits them 60 train / 20 val
DEFAULT_TEST_IMAGES = 10

# The 46 categories of iMaterialist (Fashion) 2019: (name, supercategory), ids 0-45.
# 0-26 are garments and accessories (level 1), 27-45 garment parts, closures, decorations (level 2).
CATEGORIES = [
    ("shirt, blouse", "upperbody"), ("top, t-shirt, sweatshirt", "upperbody"),
    ("sweater", "upperbody"), ("cardigan", "upperbody"), ("jacket", "upperbody"),
    ("vest", "upperbody"), ("pants", "lowerbody"), ("shorts", "lowerbody"),
    ("skirt", "lowerbody"), ("coat", "wholebody"), ("dress", "wholebody"),
    ("jumpsuit", "wholebody"), ("cape", "wholebody"), ("glasses", "head"), ("hat", "head"),
    ("headband, head covering, hair accessory", "head"), ("tie", "neck"),
    ("glove", "arms and hands"), ("watch", "arms and hands"), ("belt", "waist"),
    ("leg warmer", "legs and feet"), ("tights, stockings", "legs and feet"),
    ("sock", "legs and feet"), ("shoe", "legs and feet"), ("bag, wallet", "others"),
    ("scarf", "others"), ("umbrella", "others"), ("hood", "garment parts"),
    ("collar", "garment parts"), ("lapel", "garment parts"), ("epaulette", "garment parts"),
    ("sleeve", "garment parts"), ("pocket", "garment parts"), ("neckline", "garment parts"),
    ("buckle", "closures"), ("zipper", "closures"), ("applique", "decorations"),
    ("bead", "decorations"), ("bow", "decorations"), ("flower", "decorations"),
    ("fringe", "decorations"), ("ribbon", "decorations"), ("rivet", "decorations"),
    ("ruffle", "decorations"), ("sequin", "decorations"), ("tassel", "decorations"),
]

# 92 attribute entries (ids 0-91). The names are placeholders in the style of the real file.
_ATTRIBUTE_NAMES = (
    "classic (t-shirt)", "polo (shirt)", "undershirt", "henley (shirt)", "ringer (t-shirt)",
    "raglan (t-shirt)", "rugby (shirt)", "sailor (shirt)", "crop (top)", "halter (top)",
    "camisole", "tank (top)", "peasant (top)", "tube (top)", "tunic (top)", "smock (top)",
    "hoodie", "blazer", "pea (jacket)", "puffer (jacket)", "biker (jacket)", "trucker (jacket)",
    "bomber (jacket)", "anorak", "safari (jacket)", "mao (jacket)", "nehru (jacket)",
    "norfolk (jacket)", "classic military (jacket)", "track (jacket)", "windbreaker",
    "chanel (jacket)", "bolero", "tuxedo (jacket)", "varsity (jacket)", "crop (jacket)",
    "jeans", "sweatpants", "leggings", "hip-huggers (pants)", "cargo (pants)", "culottes",
    "capri (pants)", "harem (pants)", "sailor (pants)", "jodhpur", "peg (pants)", "camo (pants)",
    "track (pants)", "crop (pants)", "short (shorts)", "booty (shorts)", "bermuda (shorts)",
    "cargo (shorts)", "trunks", "boardshorts", "skort", "roll-up (shorts)", "tie-up (shorts)",
    "culotte (shorts)", "lounge (shorts)", "bloomers", "tutu (skirt)", "kilt", "wrap (skirt)",
    "skater (skirt)", "cargo (skirt)", "hobble (skirt)", "sheath (skirt)", "ball gown (skirt)",
    "gypsy (skirt)", "rah-rah (skirt)", "prairie (skirt)", "flamenco (skirt)",
    "accordion (skirt)", "sarong (skirt)", "tulip (skirt)", "dirndl (skirt)", "godet (skirt)",
    "blanket (coat)", "parka", "trench (coat)", "pea (coat)", "shearling (coat)",
    "teddy bear (coat)", "puffer (coat)", "duster (coat)", "raincoat", "kimono", "robe",
    "dress (coat)", "duffle (coat)",
)
assert len(_ATTRIBUTE_NAMES) == 92 and len(CATEGORIES) == 46

# The demo's attributes (ids into the 92 entries) and their names in label_descriptions.json;
# each has a visible cue (_draw_attribute).
HEM_BAND, PINSTRIPES, EDGE_TRIM = 0, 1, 2
DEMO_ATTRIBUTES = {HEM_BAND: "hem band", PINSTRIPES: "pinstripes", EDGE_TRIM: "edge trim"}
ATTRIBUTE_PROBABILITY = 0.35

# Demo categories (iMaterialist ids), colour (RGB), texture and attribute ids they may carry.
TOP, PANTS, SKIRT, DRESS, SHOE, BAG = 1, 6, 8, 10, 23, 24
STYLE = {
    TOP: ((205, 40, 45), "hstripes", (HEM_BAND, EDGE_TRIM)),
    PANTS: ((35, 60, 185), "denim", (HEM_BAND, PINSTRIPES)),
    SKIRT: ((40, 160, 60), "pleats", (HEM_BAND, PINSTRIPES, EDGE_TRIM)),
    DRESS: ((150, 50, 170), "dots", (HEM_BAND, PINSTRIPES, EDGE_TRIM)),
    SHOE: ((235, 140, 20), "plain", (EDGE_TRIM,)),
    BAG: ((225, 205, 35), "checker", (PINSTRIPES, EDGE_TRIM)),
}
DEMO_CATEGORIES = tuple(STYLE)
ATTRIBUTE_CATEGORIES = {a: tuple(c for c in STYLE if a in STYLE[c][2]) for a in DEMO_ATTRIBUTES}
MIN_VISIBLE_PIXELS = 120


def label_descriptions():
    """The label_descriptions.json content of the demo (the real categories)."""
    return {
        "info": {
            "year": 2019, "version": "demo-%d" % DEMO_VERSION,
            "description": "mrcnn fashion demo: synthetic garment shapes in the file format of "
                           "iMaterialist (Fashion) 2019. Categories are the competition's; "
                           "attributes 0-2 are the demo's (hem band, pinstripes, edge trim: "
                           "drawn on the garments), the other attribute names are "
                           "placeholders, not the real ones.",
            "contributor": "mrcnn (generated)", "url": "", "date_created": "generated",
        },
        "categories": [{"id": i, "name": n, "supercategory": s, "level": 1 if i <= 26 else 2}
                       for i, (n, s) in enumerate(CATEGORIES)],
        "attributes": [{"id": i, "name": DEMO_ATTRIBUTES.get(i, n),
                        "supercategory": "demo" if i in DEMO_ATTRIBUTES else "nickname",
                        "level": 1}
                       for i, n in enumerate(_ATTRIBUTE_NAMES)],
    }


# ----------------------------------------------------------------------------- drawing

def _background(rng, h, w):
    """A low-saturation textured background [h, w, 3] uint8."""
    base = rng.uniform(110, 200) + rng.uniform(-18, 18, size=3)
    noise = cv2.GaussianBlur(rng.normal(0, 22, (h, w)).astype(np.float32), (0, 0), 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(10, 30)
    angle = rng.uniform(0, np.pi)
    waves = 10 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    shade = np.linspace(-20, 20, h, dtype=np.float32)[:, None]
    image = base[None, None, :] + (noise + waves + shade)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _texture(rng, h, w, colour, kind):
    """A garment texture [h, w, 3] float32 in the category's colour family."""
    colour = np.clip(np.asarray(colour, np.float32) + rng.uniform(-20, 20, 3), 0, 255)
    tex = np.ones((h, w, 3), np.float32) * colour
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "hstripes":
        stripe = ((yy // int(rng.integers(6, 10))) % 2 == 0)
        tex[stripe] = tex[stripe] * 0.55 + 255 * 0.45
    elif kind == "denim":
        tex *= 1 + 0.18 * np.sin((xx + yy) * 1.3)[..., None]
    elif kind == "pleats":
        tex *= 0.8 + 0.2 * np.abs(np.sin(xx * np.pi / rng.integers(7, 12)))[..., None]
    elif kind == "dots":
        step = int(rng.integers(9, 13))
        dots = ((yy % step - step // 2) ** 2 + (xx % step - step // 2) ** 2) < (step // 4) ** 2
        tex[dots] = 245
    elif kind == "checker":
        step = int(rng.integers(8, 13))
        check = ((yy // step + xx // step) % 2 == 0)
        tex[check] *= 0.6
    tex += rng.normal(0, 6, (h, w, 1))
    return np.clip(tex, 0, 255)


def _poly(points, cx, cy, sx, sy):
    """Scale unit-box points ([-0.5, 0.5]) around (cx, cy) into an int32 polygon."""
    p = np.asarray(points, np.float32)
    return np.stack([cx + p[:, 0] * sx, cy + p[:, 1] * sy], axis=1).round().astype(np.int32)


def _shape_mask(category, h, w, cx, cy, sx, sy, rng):
    """Boolean mask [h, w] of one garment-like shape centred at (cx, cy), size (sx, sy)."""
    m = np.zeros((h, w), np.uint8)
    if category == TOP:      # a T: body and two short sleeves
        pts = [(-0.5, -0.5), (0.5, -0.5), (0.5, -0.1), (0.3, -0.05), (0.3, 0.5), (-0.3, 0.5),
               (-0.3, -0.05), (-0.5, -0.1)]
        cv2.fillPoly(m, [_poly(pts, cx, cy, sx, sy)], 1)
        cv2.ellipse(m, (int(cx), int(cy - sy / 2)), (max(2, int(sx * 0.1)), max(2, int(sy * 0.08))),
                    0, 0, 180, 0, -1)                                       # neckline
    elif category == PANTS:  # two legs joined at the waist
        pts = [(-0.35, -0.5), (0.35, -0.5), (0.5, 0.5), (0.08, 0.5), (0.0, -0.1),
               (-0.08, 0.5), (-0.5, 0.5)]
        cv2.fillPoly(m, [_poly(pts, cx, cy, sx, sy)], 1)
    elif category == SKIRT:  # a trapezoid
        pts = [(-0.3, -0.5), (0.3, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        cv2.fillPoly(m, [_poly(pts, cx, cy, sx, sy)], 1)
    elif category == DRESS:  # straps, fitted waist, wide hem
        pts = [(-0.3, -0.5), (-0.2, -0.5), (-0.1, -0.35), (0.1, -0.35), (0.2, -0.5), (0.3, -0.5),
               (0.25, -0.1), (0.15, 0.0), (0.5, 0.5), (-0.5, 0.5), (-0.15, 0.0), (-0.25, -0.1)]
        cv2.fillPoly(m, [_poly(pts, cx, cy, sx, sy)], 1)
    elif category == SHOE:   # a sole and a rounded upper
        cv2.ellipse(m, (int(cx), int(cy)), (max(3, int(sx / 2)), max(2, int(sy / 3))),
                    0, 0, 360, 1, -1)
        cv2.rectangle(m, (int(cx - sx / 2), int(cy - sy / 2)), (int(cx - sx / 8), int(cy)), 1, -1)
    elif category == BAG:    # a box and a handle
        pts = [(-0.5, -0.1), (0.5, -0.1), (0.45, 0.5), (-0.45, 0.5)]
        cv2.fillPoly(m, [_poly(pts, cx, cy, sx, sy)], 1)
        cv2.ellipse(m, (int(cx), int(cy - sy * 0.1)), (max(3, int(sx * 0.3)), max(3, int(sy * 0.38))),
                    0, 180, 360, 1, max(2, int(min(sx, sy) * 0.08)))
    return m.astype(bool)


def _outfit(rng, h, w):
    """A list of (category, cx, cy, sx, sy), drawn in this order (later ones on top)."""
    items = []
    cx = w * rng.uniform(0.35, 0.65)
    scale = rng.uniform(0.8, 1.1)
    if rng.random() < 0.4:
        dress_h = h * 0.62 * scale
        top_y = h * rng.uniform(0.08, 0.15)
        items.append((DRESS, cx, top_y + dress_h / 2, w * 0.55 * scale, dress_h))
        feet_y = top_y + dress_h + h * 0.05
    else:
        top_h = h * 0.33 * scale
        top_y = h * rng.uniform(0.05, 0.12)
        lower = PANTS if rng.random() < 0.55 else SKIRT
        low_h = h * (0.45 if lower == PANTS else 0.3) * scale
        low_y = top_y + top_h * 0.85
        # Lower garment first, the top overlaps its waist.
        items.append((lower, cx + rng.uniform(-6, 6), low_y + low_h / 2,
                      w * (0.42 if lower == PANTS else 0.5) * scale, low_h))
        items.append((TOP, cx, top_y + top_h / 2, w * 0.62 * scale, top_h))
        feet_y = low_y + low_h + h * 0.04
    if rng.random() < 0.85:
        shoe_w, shoe_h = w * 0.16 * scale, h * 0.07 * scale
        fy = min(feet_y, h - shoe_h * 0.6)
        items.append((SHOE, cx - shoe_w * 0.7, fy, shoe_w, shoe_h))
        if rng.random() < 0.8:
            items.append((SHOE, cx + shoe_w * 0.7, fy + rng.uniform(-3, 3), shoe_w, shoe_h))
    if rng.random() < 0.6:
        side = rng.choice([-1, 1])
        items.append((BAG, cx + side * w * rng.uniform(0.22, 0.38), h * rng.uniform(0.4, 0.65),
                       w * rng.uniform(0.2, 0.3), h * rng.uniform(0.16, 0.24)))
    return items


def _draw_attribute(tex, m, attribute, cy, sy):
    """Draw one attribute's cue on the texture `tex` of the shape `m` (in place)."""
    h, w = m.shape
    if attribute == HEM_BAND:           # a light band across the lower part of the shape
        rows = np.flatnonzero(m.any(axis=1))
        bottom = rows.max() if len(rows) else int(cy + sy / 2)
        height = max(3, int(round(sy * 0.08)))
        y2 = max(0, bottom - max(2, int(round(sy * 0.06))))
        y1 = max(0, y2 - height)
        tex[y1:y2] = tex[y1:y2] * 0.2 + np.array([250, 245, 225], np.float32) * 0.8
    elif attribute == PINSTRIPES:       # thin dark vertical stripes
        xx = np.arange(w)
        tex[:, (xx % 7) < 2] *= 0.3
    elif attribute == EDGE_TRIM:        # a dark outline along the shape's edge
        inner = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2)
        edge = m & ~inner.astype(bool)
        tex[edge] = (25, 25, 25)


def draw_image_with_attributes(rng, h, w):
    """One demo image: (image [h, w, 3] uint8, masks [h, w, N] bool, categories [N],
    attribute id tuples [N] (sorted))."""
    image = _background(rng, h, w).astype(np.float32)
    masks, cats, attrs = [], [], []
    for category, cx, cy, sx, sy in _outfit(rng, h, w):
        m = _shape_mask(category, h, w, cx, cy, sx, sy, rng)
        if not m.any():
            continue
        colour, kind, pool = STYLE[category]
        tex = _texture(rng, h, w, colour, kind)
        chosen = tuple(a for a in pool if rng.random() < ATTRIBUTE_PROBABILITY)
        for a in chosen:
            _draw_attribute(tex, m, a, cy, sy)
        image[m] = tex[m]
        for previous in masks:          # occlusion: earlier masks keep their visible part
            previous &= ~m
        masks.append(m)
        cats.append(category)
        attrs.append(tuple(sorted(chosen)))
    keep = [i for i, m in enumerate(masks) if m.sum() >= MIN_VISIBLE_PIXELS]
    image = np.clip(cv2.GaussianBlur(image, (3, 3), 0.6), 0, 255).astype(np.uint8)
    if not keep:
        return image, np.zeros((h, w, 0), bool), np.zeros((0,), np.int32), []
    return (image, np.stack([masks[i] for i in keep], axis=-1),
            np.array([cats[i] for i in keep], np.int32), [attrs[i] for i in keep])


def draw_image(rng, h, w):
    """One demo image: (image [h, w, 3] uint8, masks [h, w, N] bool, categories [N])."""
    return draw_image_with_attributes(rng, h, w)[:3]


def _image_id(seed, part, i):
    return hashlib.md5(("mrcnn-demo-%d-%s-%d" % (seed, part, i)).encode()).hexdigest() + ".jpg"


def _write_jpeg(path, image):
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError("could not write %s" % path)


SIZES = ((320, 256), (352, 288), (384, 288), (320, 320), (288, 256), (384, 320))


def generate(root, seed=DEFAULT_SEED, n_train=DEFAULT_TRAIN_IMAGES, n_test=DEFAULT_TEST_IMAGES,
             sizes=SIZES):
    """Write a demo dataset into the folder `root` (created; existing files are overwritten).

    Deterministic: the same seed and arguments give the same files.
    sizes: (height, width) choices of the images.
    Returns root.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    lines = ["ImageId,EncodedPixels,Height,Width,ClassId"]
    for i in range(n_train):
        h, w = sizes[int(rng.integers(len(sizes)))]
        image, masks, cats, attributes = draw_image_with_attributes(rng, h, w)
        image_id = _image_id(seed, "train", i)
        _write_jpeg(os.path.join(root, "train", image_id), image)
        for k, category in enumerate(cats):
            class_id = str(category) + "".join("_%d" % a for a in attributes[k])
            lines.append("%s,%s,%d,%d,%s" % (image_id, utils.rle_encode(masks[..., k]), h, w, class_id))
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    sub = ["ImageId,EncodedPixels,ClassId"]
    for i in range(n_test):
        h, w = sizes[int(rng.integers(len(sizes)))]
        image, _, _ = draw_image(rng, h, w)
        image_id = _image_id(seed, "test", i)
        _write_jpeg(os.path.join(root, "test", image_id), image)
        sub.append("%s,1 1,23" % image_id)
    with open(os.path.join(root, "sample_submission.csv"), "w") as f:
        f.write("\n".join(sub) + "\n")
    with open(os.path.join(root, "label_descriptions.json"), "w") as f:
        json.dump(label_descriptions(), f, indent=1)
    return root


def default_demo_dir():
    """samples/fashion/demo_data if that folder is writable, else ~/.cache/mrcnn/fashion_demo."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data")
    parent = os.path.dirname(here)
    if os.access(parent, os.W_OK) or os.path.isdir(here):
        return here
    return os.path.join(os.path.expanduser("~"), ".cache", "mrcnn", "fashion_demo")


def ensure_demo_data(path=None, seed=DEFAULT_SEED, n_train=DEFAULT_TRAIN_IMAGES,
                     n_test=DEFAULT_TEST_IMAGES, sizes=SIZES, verbose=True):
    """Return the folder of the demo dataset, generating it first if absent or outdated.

    The folder is written under a temporary name and renamed into place, so an interrupted
    generation never leaves a half-written dataset; a stamp file (demo.json) records the
    version and parameters.
    """
    path = os.path.abspath(path or default_demo_dir())
    stamp = {"version": DEMO_VERSION, "seed": seed, "n_train": n_train, "n_test": n_test,
             "sizes": [list(s) for s in sizes]}
    stamp_path = os.path.join(path, "demo.json")
    if os.path.isfile(stamp_path):
        try:
            with open(stamp_path) as f:
                if json.load(f) == stamp:
                    return path
        except (OSError, ValueError):
            pass
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if verbose:
        print("Generating the demo dataset (%d train + %d test images) in %s ..."
              % (n_train, n_test, path), flush=True)
    tmp = tempfile.mkdtemp(prefix=".demo_tmp_", dir=parent)
    try:
        generate(tmp, seed=seed, n_train=n_train, n_test=n_test, sizes=sizes)
        with open(os.path.join(tmp, "demo.json"), "w") as f:
            json.dump(stamp, f)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process put a complete dataset there first.
            if not os.path.isfile(stamp_path):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
