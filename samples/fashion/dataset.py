"""iMaterialist (Fashion) 2019 / Fashionpedia as an `mrcnn.utils.Dataset`.

    dataset = FashionDataset()
    dataset.load_dataset("/data/imaterialist", subset="train", val_fraction=0.1, seed=42)
    dataset.prepare()
    masks, class_ids = dataset.load_mask(image_id)        # bool [H, W, N], int32 [N] (1..46)
    attributes = dataset.load_attributes(image_id)         # [N] tuples of attribute ids

Two input formats:

* iMaterialist 2019 (Kaggle): a folder with train.csv, label_descriptions.json, train/.
  Category c (0-45) becomes class id c + 1; "6_28_71" is category 6 with attributes 28, 71.
* Fashionpedia: a COCO-style JSON (instances_attributes_*.json) with `categories`,
  `attributes`, `images`, `annotations` (segmentation as polygons or RLE, `attribute_ids`);
  pass its path as `annotations=` (images are looked up next to it or in `image_dir`).

How train.csv is indexed (the full file has 333,415 rows, about a gigabyte of RLE text):
the file is scanned in blocks of bytes with numpy (newline and comma positions), the short
fields (ImageId, Height, Width, ClassId) are cut out and parsed by pandas, and of the
EncodedPixels column only the byte offset and length of each field are kept. Memory stays
bounded whatever the file size (the RLE text is never held), no Python runs per row, and
`load_mask` reads an image's few rows back with seeks. A file with quoted fields falls back to
pandas.read_csv (RLE strings then held in memory).

Image sizes: train.csv gives Height/Width per row; checking them against 45,625 JPEG files up
front costs a header read each (tens of seconds on a cold disk), so it is done lazily: load_mask
reads the image header (a few hundred bytes, no decoding) and compares. A disagreeing image
raises `SizeMismatchError` (a `utils.MaskError`) naming both sizes; the loader's
ON_LOAD_ERROR="skip" (FashionConfig's default) counts it and uses another sample.
`check_image_sizes()` does the same check for every image up front, drops the disagreeing
ones and reports the count (`fashion.py train --check-sizes`). The two ImageIds GUIDE.md lists
as wrong in train.csv are fixed instead of skipped: their masks are decoded with the CSV's
(Height, Width), then transposed and flipped vertically (`mask.T[::-1, :]`).
"""

import io
import json
import logging
import os

import numpy as np
import pandas as pd

from mrcnn import utils
from mrcnn.errors import MrcnnError

logger = logging.getLogger(__name__)

SOURCE = "fashion"
NUM_CATEGORIES = 46

# ImageIds whose Height/Width in train.csv are swapped; GUIDE.md: decode with the CSV's
# (Height, Width), then mask.T[::-1, :].
TRANSPOSED_IMAGE_IDS = frozenset({
    "f4d6e71fbffc3e891e5009fef2c8bf6b.jpg",
    "2ab8c02ce17612733ddee218b4ce1fd1.jpg",
})

CSV_COLUMNS = ("ImageId", "EncodedPixels", "Height", "Width", "ClassId")
BLOCK_BYTES = 32 << 20


class DatasetError(MrcnnError, ValueError):
    """A dataset folder or annotation file that cannot be used (the message says why)."""


class SizeMismatchError(utils.MaskError):
    """train.csv's Height/Width of an image disagree with the image file."""


# ----------------------------------------------------------------------------- label files

def read_label_descriptions(path):
    """Read label_descriptions.json -> (categories {id: dict}, attributes {id: dict}, info)."""
    if not os.path.isfile(path):
        raise DatasetError("label_descriptions.json not found: %s (it comes with the "
                           "iMaterialist download, next to train.csv)" % path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError("%s is not valid JSON: %s" % (path, e)) from None
    try:
        categories = {int(c["id"]): dict(c) for c in data["categories"]}
        attributes = {int(a["id"]): dict(a) for a in data.get("attributes", [])}
        for c in categories.values():
            str(c["name"])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError("%s is malformed: expected 'categories' (and 'attributes') lists of "
                           "{id, name, ...} entries (%s: %s)" % (path, type(e).__name__, e)) \
            from None
    if not categories:
        raise DatasetError("%s lists no categories" % path)
    return categories, attributes, data.get("info", {})


def _check_image_id(image_id, where):
    """Reject ImageIds that could name a file outside the image folder."""
    if (not image_id or "/" in image_id or "\\" in image_id or ".." in image_id
            or image_id.startswith("~") or "\x00" in image_id or os.path.isabs(image_id)):
        raise DatasetError("%s: ImageId %r is not a plain file name (path separators and '..' "
                           "are not allowed: nothing is read outside the dataset folder)"
                           % (where, image_id))


# ----------------------------------------------------------------------------- train.csv index

def _concat_ranges(starts, ends):
    """Indices of the concatenated ranges [starts[i], ends[i]) without a Python loop."""
    lengths = (ends - starts).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    # Each position's index is its offset within the output plus a per-range shift.
    shift = starts.astype(np.int64) - (np.cumsum(lengths) - lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(shift, lengths)


class CsvIndex:
    """Row table of a train.csv: short columns in numpy, EncodedPixels as byte spans.

    Attributes (one entry per data row, in file order):
        image_ids   numpy object array of str
        heights, widths   int32
        class_strings     numpy object array of the ClassId text ("6", "6_28_71")
        line_numbers      int64, 1-based line in the file (the header is line 1)
        rle_offsets, rle_lengths   int64 byte spans of EncodedPixels (None when held in memory)
        rle_strings       numpy object array (only for the pandas fallback)
    """

    def __init__(self, path):
        self.path = path
        self.rle_offsets = self.rle_lengths = self.rle_strings = None
        with open(path, "rb") as f:
            header_line = f.readline()
        header = [h.strip().strip('"') for h in header_line.decode("utf-8-sig").strip().split(",")]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DatasetError("%s: header %s lacks column(s) %s (expected %s)"
                               % (path, ",".join(header), ", ".join(missing), ",".join(CSV_COLUMNS)))
        self.header = header
        if not self._scan(len(header_line)):
            self._read_with_pandas()

    # Fast path ------------------------------------------------------------------------------
    def _scan(self, data_start):
        """Index the file block by block with numpy; False if it has quoted fields."""
        ncols = len(self.header)
        rle_col = self.header.index("EncodedPixels")
        short_header = ",".join(c for c in self.header if c != "EncodedPixels")
        parts = []
        offsets, lengths, line_numbers = [], [], []
        line_base = 2
        with open(self.path, "rb") as f:
            f.seek(data_start)
            pos = data_start
            carry = b""
            while True:
                block = f.read(BLOCK_BYTES)
                eof = not block
                data = carry + block
                if eof:
                    if not data.strip():
                        break
                    if not data.endswith(b"\n"):
                        data += b"\n"
                base = pos - len(carry)
                arr = np.frombuffer(data, dtype=np.uint8)
                newlines = np.flatnonzero(arr == 10)
                if newlines.size == 0:
                    carry = data
                    pos += len(block)
                    continue
                end = int(newlines[-1]) + 1
                carry = data[end:]
                pos += len(block)
                arr = arr[:end]
                if (arr == 34).any():          # a quote: let pandas handle the quoting rules
                    return False
                line_starts = np.concatenate([[0], newlines[:-1] + 1])
                line_ends = newlines                           # exclusive (the \n)
                # Skip blank lines (also "\r" alone).
                nonblank = (line_ends - line_starts) > np.where(
                    arr[np.maximum(line_ends - 1, 0)] == 13, 1, 0)
                numbers = line_base + np.arange(line_starts.size)
                line_base += line_starts.size
                line_starts, line_ends, numbers = (line_starts[nonblank], line_ends[nonblank],
                                                   numbers[nonblank])
                commas = np.flatnonzero(arr == 44)
                first = np.searchsorted(commas, line_starts)
                count = np.searchsorted(commas, line_ends) - first
                bad = np.flatnonzero(count != ncols - 1)
                if bad.size:
                    k = int(bad[0])
                    text = data[line_starts[k]:min(line_ends[k], line_starts[k] + 120)]
                    raise DatasetError("%s line %d: expected %d comma-separated fields, found %d: "
                                       "%r" % (self.path, numbers[k], ncols, count[k] + 1,
                                               text.decode("utf-8", "replace")))
                # EncodedPixels lies between comma rle_col-1 (or the line start) and comma rle_col.
                rle_begin = (line_starts if rle_col == 0
                             else commas[first + rle_col - 1] + 1)
                rle_end = commas[first + rle_col] if rle_col < ncols - 1 else line_ends
                offsets.append(base + rle_begin)
                lengths.append(rle_end - rle_begin)
                line_numbers.append(numbers)
                # Keep the bytes of each line but the EncodedPixels field and one of its commas:
                # two ranges per line, gathered with one index array (O(kept bytes)).
                cut_begin = rle_begin - (1 if rle_col > 0 else 0)
                cut_end = rle_end + (1 if rle_col == 0 else 0)
                range_starts = np.stack([line_starts, cut_end], 1).ravel()
                range_ends = np.stack([cut_begin, line_ends + 1], 1).ravel()   # with the \n
                parts.append(arr[_concat_ranges(range_starts, range_ends)].tobytes())
        if not parts:
            raise DatasetError("%s has a header but no rows" % self.path)
        text = short_header.encode() + b"\n" + b"".join(parts)
        df = pd.read_csv(io.BytesIO(text), dtype={"ImageId": str, "ClassId": str},
                         keep_default_na=False, na_values=[], skipinitialspace=True)
        self.rle_offsets = np.concatenate(offsets).astype(np.int64)
        self.rle_lengths = np.concatenate(lengths).astype(np.int64)
        self.line_numbers = np.concatenate(line_numbers).astype(np.int64)
        self._set_columns(df)
        return True

    # Fallback ---------------------------------------------------------------------------------
    def _read_with_pandas(self):
        df = pd.read_csv(self.path, dtype={"ImageId": str, "ClassId": str, "EncodedPixels": str},
                         keep_default_na=False, na_values=[], skip_blank_lines=True)
        self.rle_strings = df["EncodedPixels"].to_numpy(dtype=object)
        # Line numbers are exact unless quoted fields span lines (they do not in this format).
        self.line_numbers = np.arange(2, len(df) + 2, dtype=np.int64)
        self._set_columns(df)

    def _set_columns(self, df):
        n = len(df)
        for column in ("Height", "Width"):
            values = pd.to_numeric(df[column], errors="coerce")
            bad = np.flatnonzero(values.isna().to_numpy() | (values.to_numpy() < 1))
            if bad.size:
                k = int(bad[0])
                raise DatasetError("%s line %d: %s must be a positive integer, got %r"
                                   % (self.path, self.line_numbers[k], column, df[column].iloc[k]))
            setattr(self, column.lower() + "s", values.to_numpy().astype(np.int32))
        self.image_ids = df["ImageId"].to_numpy(dtype=object)
        self.class_strings = df["ClassId"].to_numpy(dtype=object)
        assert len(self.image_ids) == n == len(self.line_numbers)

    def __len__(self):
        return len(self.image_ids)

    def read_rles(self, rows, handle=None):
        """EncodedPixels strings of the given row indices."""
        if self.rle_strings is not None:
            return [self.rle_strings[r] for r in rows]
        out = []
        close = handle is None
        f = handle or open(self.path, "rb")
        try:
            for r in rows:
                f.seek(int(self.rle_offsets[r]))
                out.append(f.read(int(self.rle_lengths[r])).decode("ascii", "replace").strip())
        finally:
            if close:
                f.close()
        return out


# ----------------------------------------------------------------------------- ClassId parsing

_CLASS_RE = r"^(\d+)((?:_\d+)*)$"


def parse_class_ids(class_strings, categories, path, line_numbers):
    """Split ClassId strings into (category int32 [R], attribute tuples [R]).

    Raises DatasetError naming the line for a malformed ClassId or an unknown category.
    """
    s = pd.Series(class_strings, dtype=object)
    # Most ClassIds are a bare category id: convert those in C, the rest with a regex.
    numeric = pd.to_numeric(s, errors="coerce").to_numpy()
    category = np.zeros(len(s), np.int64)
    plain = ~np.isnan(numeric) & (numeric == np.round(numeric)) & (numeric >= 0)
    category[plain] = numeric[plain].astype(np.int64)
    rest = np.flatnonzero(~plain)
    tails = {}
    if rest.size:
        parts = s.iloc[rest].astype(str).str.extract(_CLASS_RE)
        bad = np.flatnonzero(parts[0].isna().to_numpy())
        if bad.size:
            k = int(rest[bad[0]])
            raise DatasetError("%s line %d: ClassId %r is not a category id optionally followed "
                               "by attribute ids ('6' or '6_28_71')"
                               % (path, line_numbers[k], s.iloc[k]))
        category[rest] = parts[0].astype(np.int64).to_numpy()
        tails = dict(zip(rest.tolist(), parts[1].tolist()))
    known = np.array(sorted(categories), dtype=np.int64)
    unknown = np.flatnonzero(~np.isin(category, known))
    if unknown.size:
        k = int(unknown[0])
        raise DatasetError("%s line %d: ClassId %r has category %d, which is not in "
                           "label_descriptions.json (known ids %d-%d); %d row(s) affected"
                           % (path, line_numbers[k], s.iloc[k], category[k], known.min(),
                              known.max(), unknown.size))
    attributes = [()] * len(s)
    for k, tail in tails.items():     # ~3.5% of the rows
        if tail:
            attributes[k] = tuple(int(a) for a in tail.split("_")[1:])
    return category.astype(np.int32), attributes


# ----------------------------------------------------------------------------- dataset

class FashionDataset(utils.Dataset):
    """iMaterialist (Fashion) 2019 or Fashionpedia instances; class id = category id + 1."""

    def __init__(self, class_map=None):
        super().__init__(class_map)
        self.attribute_info = {}
        self.dataset_info = {}
        self.skipped = {}              # reason -> count (images left out while indexing)
        self._csv = None
        self._row_category = None
        self._row_attributes = None

    # -------------------------------------------------------------- loading
    def load_dataset(self, dataset_dir, subset="train", val_fraction=0.1, seed=42, limit=None,
                     annotations=None, image_dir=None):
        """Index a dataset folder.

        dataset_dir: the iMaterialist folder (train.csv, label_descriptions.json, train/, test/).
        subset: "train" or "val" (a deterministic split of train.csv's images: val_fraction of
            them, chosen by a permutation seeded with `seed`), "all" (no split) or "test" (the
            images of test/, without annotations).
        limit: keep at most this many images (after the split).
        annotations: a Fashionpedia COCO-style JSON instead of train.csv (subset applies the
            same split; "all" keeps every image); image_dir: its images (default: the JSON's
            folder, or dataset_dir/train or dataset_dir/test if they hold the files).
        Returns self (call prepare() afterwards).
        """
        if subset not in ("train", "val", "all", "test"):
            raise DatasetError("subset must be 'train', 'val', 'all' or 'test', not %r" % subset)
        if not 0 <= val_fraction < 1:
            raise DatasetError("val_fraction must be in [0, 1), not %r" % val_fraction)
        if annotations is not None:
            return self._load_fashionpedia(annotations, image_dir or dataset_dir, subset,
                                           val_fraction, seed, limit)
        if dataset_dir is None or not os.path.isdir(dataset_dir):
            raise DatasetError("dataset folder not found: %s (expected the iMaterialist 2019 "
                               "download: train.csv, label_descriptions.json, train/, test/)"
                               % dataset_dir)
        categories, attributes, info = read_label_descriptions(
            os.path.join(dataset_dir, "label_descriptions.json"))
        self._add_classes(categories, attributes, info)
        if subset == "test":
            return self._load_test(dataset_dir, limit)
        csv_path = os.path.join(dataset_dir, "train.csv")
        if not os.path.isfile(csv_path):
            raise DatasetError("train.csv not found in %s" % dataset_dir)
        image_folder = os.path.join(dataset_dir, "train")
        if not os.path.isdir(image_folder):
            raise DatasetError("image folder not found: %s" % image_folder)
        self._index_csv(csv_path, image_folder, categories, subset, val_fraction, seed, limit)
        return self

    def _add_classes(self, categories, attributes, info):
        for cid in sorted(categories):
            self.add_class(SOURCE, cid, categories[cid]["name"])
        self.attribute_info = attributes
        self.dataset_info = info
        self.categories = categories
        # Category id -> class id (1..N in the order of the sorted category ids, as prepare()
        # numbers them): iMaterialist's 0..45 become 1..46.
        ids = sorted(categories)
        self._category_to_class = np.zeros(max(ids) + 1, np.int32)
        self._category_to_class[ids] = np.arange(1, len(ids) + 1)

    def _load_test(self, dataset_dir, limit):
        folder = os.path.join(dataset_dir, "test")
        if not os.path.isdir(folder):
            raise DatasetError("test image folder not found: %s" % folder)
        names = sorted(n for n in os.listdir(folder)
                       if n.lower().endswith((".jpg", ".jpeg", ".png")) and not n.startswith("."))
        if limit:
            names = names[:limit]
        for name in names:
            self.add_image(SOURCE, image_id=name, path=os.path.join(folder, name))
        return self

    @staticmethod
    def split(image_ids, subset, val_fraction, seed):
        """Boolean array: which of the (sorted, unique) image_ids belong to `subset`."""
        n = len(image_ids)
        if subset == "all":
            return np.ones(n, bool)
        order = np.random.default_rng(seed).permutation(n)
        n_val = int(round(n * val_fraction))
        is_val = np.zeros(n, bool)
        is_val[order[:n_val]] = True
        return is_val if subset == "val" else ~is_val

    def _index_csv(self, csv_path, image_folder, categories, subset, val_fraction, seed, limit):
        csv = CsvIndex(csv_path)
        codes, names = pd.factorize(pd.Series(csv.image_ids, dtype=object), sort=True)
        names = np.asarray(names, dtype=object)
        for k in np.flatnonzero(pd.Series(names).str.contains(r"[/\\\x00]|\.\.|^~|^$",
                                                               regex=True).to_numpy()):
            first = int(np.flatnonzero(codes == k)[0])
            _check_image_id(names[k], "%s line %d" % (csv_path, csv.line_numbers[first]))
        category, row_attributes = parse_class_ids(csv.class_strings, categories, csv_path,
                                                   csv.line_numbers)
        # Group rows by image (stable: rows of an image keep their file order).
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=len(names))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        h = csv.heights[order]
        w = csv.widths[order]
        consistent = ((np.maximum.reduceat(h, starts) == np.minimum.reduceat(h, starts))
                      & (np.maximum.reduceat(w, starts) == np.minimum.reduceat(w, starts)))
        inconsistent = np.flatnonzero(~consistent)
        if inconsistent.size:
            self.skipped["rows of one image disagree on Height/Width"] = int(inconsistent.size)
            logger.warning("%s: %d image(s) whose rows disagree on Height/Width are skipped "
                           "(first: %s)", csv_path, inconsistent.size, names[inconsistent[0]])
        selected = self.split(names, subset, val_fraction, seed) & consistent
        image_indices = np.flatnonzero(selected)
        if limit:
            image_indices = image_indices[:limit]
        self._csv = csv
        self._row_order = order
        self._row_category = category
        self._row_attributes = row_attributes
        for k in image_indices:
            s, c = int(starts[k]), int(counts[k])
            name = names[k]
            rows = order[s:s + c]
            self.add_image(SOURCE, image_id=name, path=os.path.join(image_folder, name),
                           height=int(h[s]), width=int(w[s]), rows=(s, s + c),
                           class_ids=self._category_to_class[category[rows]],
                           attributes=[row_attributes[r] for r in rows])
        self.csv_path = csv_path

    def _load_fashionpedia(self, annotations, image_dir, subset, val_fraction, seed, limit):
        if not os.path.isfile(annotations):
            raise DatasetError("Fashionpedia annotation file not found: %s" % annotations)
        try:
            with open(annotations, encoding="utf-8") as f:
                data = json.load(f)
            categories = {int(c["id"]): dict(c) for c in data["categories"]}
            attributes = {int(a["id"]): dict(a) for a in data.get("attributes", [])}
            images = sorted(data["images"], key=lambda im: str(im["file_name"]))
            anns = data.get("annotations", [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError("%s is not a COCO-style JSON with categories, images and "
                               "annotations (%s: %s)" % (annotations, type(e).__name__, e)) \
                from None
        self._add_classes(categories, attributes, data.get("info", {}))
        by_image = {}
        for a in anns:
            if int(a["category_id"]) not in categories:
                raise DatasetError("%s: annotation %s has category_id %s, which is not in its "
                                   "categories" % (annotations, a.get("id"), a["category_id"]))
            by_image.setdefault(a["image_id"], []).append(a)
        if image_dir is None or not os.path.isdir(image_dir):
            image_dir = os.path.dirname(os.path.abspath(annotations))
        selected = self.split([im["file_name"] for im in images],
                              subset if subset != "test" else "all", val_fraction, seed)
        kept = [im for im, s in zip(images, selected) if s]
        if limit:
            kept = kept[:limit]
        for im in kept:
            _check_image_id(str(im["file_name"]), "%s image %s" % (annotations, im.get("id")))
            self.add_image(SOURCE, image_id=str(im["file_name"]),
                           path=os.path.join(image_dir, str(im["file_name"])),
                           height=int(im["height"]), width=int(im["width"]),
                           coco_id=im["id"], annotations=by_image.get(im["id"], []),
                           attributes=[tuple(a.get("attribute_ids") or ())
                                       for a in by_image.get(im["id"], [])])
        return self

    # -------------------------------------------------------------- per image
    def image_reference(self, image_id):
        return self.image_info[image_id]["path"]

    def _rows(self, image_id):
        s, e = self.image_info[image_id]["rows"]
        return self._row_order[s:e]

    def load_attributes(self, image_id):
        """Attribute ids of each instance of load_mask(image_id), as a list of tuples."""
        return self.load_instances(image_id)[2]

    def image_class_ids(self, image_id):
        """Class ids (1..46) of an image's annotated instances, without decoding masks."""
        info = self.image_info[image_id]
        if "rows" in info:
            return self._category_to_class[self._row_category[self._rows(image_id)]]
        return np.array([self._category_to_class[int(a["category_id"])]
                         for a in info.get("annotations", [])], np.int32)

    def check_size(self, image_id):
        """Compare the annotated size with the image file header; raise SizeMismatchError."""
        info = self.image_info[image_id]
        if "height" not in info:
            return None
        size = image_size(info["path"], image_id=info["id"])
        expected = (info["height"], info["width"])
        if info["id"] in TRANSPOSED_IMAGE_IDS:
            expected = expected[::-1]
        if size != expected:
            raise SizeMismatchError(
                "image %s: train.csv says Height %d, Width %d but the file is %dx%d (HxW); the "
                "image is skipped" % (info["id"], info["height"], info["width"], size[0], size[1]))
        return size

    def load_mask(self, image_id):
        """Instance masks (bool [H, W, N]) and class ids (int32 [N], 1..46) of an image."""
        masks, class_ids, _ = self.load_instances(image_id)
        return masks, class_ids

    def load_mask_rle(self, image_id):
        """(rles [N], class_ids int32 [N], (height, width)) for mrcnn.data's fast path, which
        resamples masks straight from the runs; None (use load_mask) for Fashionpedia images
        and the two transposed ImageIds. Duplicate rows and empty RLEs are dropped."""
        info = self.image_info[image_id]
        if "rows" not in info or info["id"] in TRANSPOSED_IMAGE_IDS:
            return None
        self.check_size(image_id)
        rows = self._rows(image_id)
        rles, classes, seen = [], [], set()
        for r, rle in zip(rows, self._csv.read_rles(rows)):
            key = (rle, self._row_category[r], self._row_attributes[r])
            if key in seen or not rle.strip():
                continue
            seen.add(key)
            rles.append(rle)
            classes.append(int(self._category_to_class[self._row_category[r]]))
        return rles, np.array(classes, np.int32), (info["height"], info["width"])

    def load_instances(self, image_id):
        """(masks bool [H, W, N], class_ids int32 [N], attributes [N] tuples).

        Empty masks and exact duplicate rows are dropped. Raises SizeMismatchError when the
        image file's size disagrees with the annotation, utils.RLEError for a malformed mask.
        """
        info = self.image_info[image_id]
        if "rows" not in info and "annotations" not in info:
            h, w = info.get("height", 0), info.get("width", 0)
            return np.zeros((h, w, 0), bool), np.zeros((0,), np.int32), []
        self.check_size(image_id)
        if "rows" in info:
            masks, classes, attrs = self._decode_csv_rows(image_id)
        else:
            masks, classes, attrs = self._decode_coco(image_id)
        if not masks:
            h, w = self._image_shape(info)
            return np.zeros((h, w, 0), bool), np.zeros((0,), np.int32), []
        return np.stack(masks, axis=-1), np.array(classes, np.int32), attrs

    @staticmethod
    def _image_shape(info):
        h, w = info["height"], info["width"]
        return (w, h) if info["id"] in TRANSPOSED_IMAGE_IDS else (h, w)

    def _decode_csv_rows(self, image_id):
        info = self.image_info[image_id]
        rows = self._rows(image_id)
        rles = self._csv.read_rles(rows)
        h, w = info["height"], info["width"]
        transposed = info["id"] in TRANSPOSED_IMAGE_IDS
        masks, classes, attrs, seen = [], [], [], set()
        for r, rle in zip(rows, rles):
            key = (rle, self._row_category[r], self._row_attributes[r])
            if key in seen:
                continue                  # duplicate row
            seen.add(key)
            where = "%s line %d" % (os.path.basename(self._csv.path), self._csv.line_numbers[r])
            m = utils.rle_decode(rle, (h, w), image_id=info["id"], where=where)
            if transposed:
                m = np.ascontiguousarray(m.T[::-1, :])
            if not m.any():
                continue
            masks.append(m)
            classes.append(int(self._category_to_class[self._row_category[r]]))
            attrs.append(self._row_attributes[r])
        return masks, classes, attrs

    def _decode_coco(self, image_id):
        from pycocotools import mask as mask_utils
        info = self.image_info[image_id]
        h, w = info["height"], info["width"]
        masks, classes, attrs = [], [], []
        for a in info["annotations"]:
            seg = a.get("segmentation")
            if not seg:
                continue
            try:
                if isinstance(seg, list):                         # polygons
                    polys = [p for p in seg if len(p) >= 6]
                    if not polys:
                        continue
                    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
                elif isinstance(seg.get("counts"), list):         # uncompressed RLE
                    rle = mask_utils.frPyObjects(seg, *seg["size"])
                else:                                             # compressed RLE
                    rle = dict(seg)
                    if isinstance(rle["counts"], str):
                        rle["counts"] = rle["counts"].encode("ascii")
                m = mask_utils.decode(rle).astype(bool)
            except Exception as e:  # noqa: BLE001 - pycocotools raises bare exceptions
                raise utils.MaskError("image %s annotation %s: bad segmentation (%s)"
                                      % (info["id"], a.get("id"), e)) from None
            if m.shape != (h, w):
                raise SizeMismatchError("image %s annotation %s: segmentation of size %s, image "
                                        "%dx%d" % (info["id"], a.get("id"), m.shape, h, w))
            if not m.any():
                continue
            masks.append(m)
            classes.append(int(self._category_to_class[int(a["category_id"])]))
            attrs.append(tuple(int(x) for x in a.get("attribute_ids", []) or []))
        return masks, classes, attrs

    # -------------------------------------------------------------- whole-dataset checks
    def check_image_sizes(self, verbose=True):
        """Header-read every image; drop those whose size disagrees with the annotation or
        whose file is missing/unreadable. Returns {reason: count}. Call before prepare()."""
        keep, counts, examples = [], {}, {}
        for i, info in enumerate(self.image_info):
            try:
                self.check_size(i)
                keep.append(info)
            except SizeMismatchError as e:
                counts["size disagrees with train.csv"] = counts.get(
                    "size disagrees with train.csv", 0) + 1
                examples.setdefault("size disagrees with train.csv", str(e))
            except utils.ImageLoadError as e:
                counts["missing or unreadable image"] = counts.get(
                    "missing or unreadable image", 0) + 1
                examples.setdefault("missing or unreadable image", str(e))
        self.image_info = keep
        for reason, n in counts.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            if verbose:
                print("Skipped %d image(s): %s (e.g. %s)" % (n, reason, examples[reason]))
        return counts


def image_size(path, image_id=None):
    """(height, width) of an image file from its header (PIL reads no pixels).

    Raises utils.ImageLoadError for a missing or unreadable file.
    """
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise utils.ImageLoadError("image %s listed in the annotations is missing: %s"
                                   % (image_id or os.path.basename(path), path),
                                   path=path, image_id=image_id) from None
    except Exception as e:  # noqa: BLE001 - PIL raises various errors for bad files
        raise utils.ImageLoadError("cannot read the header of image %s (%s): %s"
                                   % (image_id or os.path.basename(path), e, path),
                                   path=path, image_id=image_id) from None
    return int(h), int(w)


def class_names_from_labels(categories):
    """["BG", name of category 0, ...] in class-id order."""
    return ["BG"] + [categories[c]["name"] for c in sorted(categories)]


__all__ = ["FashionDataset", "DatasetError", "SizeMismatchError", "CsvIndex",
           "read_label_descriptions", "parse_class_ids", "image_size", "TRANSPOSED_IMAGE_IDS",
           "NUM_CATEGORIES", "SOURCE"]
