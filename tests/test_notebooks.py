"""Execute every notebook of notebooks/ headless, top to bottom, in the small configuration.

Each notebook runs in a fresh kernel of the interpreter running the tests (a kernelspec written
into a temporary folder points at sys.executable, so a fresh CI venv works without registering a
kernel), with MRCNN_NOTEBOOK_SMALL=1 (128 px, few ROIs), figures written to a temporary folder,
and an empty logs folder (no checkpoint: the notebooks take the random-weights path and must
say so). A cell error fails the test; the figures each notebook saves must exist and not be
blank. About a minute per notebook on a 2-core CPU.
"""

import json
import os
import sys
import time

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT = 300          # seconds per cell

# Figures each notebook must save (FIGURE_DIR/<notebook>_<name>.png).
EXPECTED_FIGURES = {
    "demo": ["detections", "ground_truth_vs_detections", "attributes", "single_image"],
    "inspect_fashion_data": ["statistics", "top_masks", "resize_modes", "mini_masks",
                             "anchors", "loader_rpn_targets", "loader_gt",
                             "detection_targets", "mask_targets"],
    "inspect_fashion_model": ["detections", "differences", "precision_recall", "overlaps",
                              "rpn_targets", "rpn_scores", "proposals_nms",
                              "classifier_refinement", "per_class_nms", "mask_targets",
                              "fcn_vs_unet_masks", "fcn_vs_unet_instances"],
    "inspect_weights": ["histograms_by_type", "histograms_by_layer"],
}

pytestmark = pytest.mark.slow  # each notebook runs in a kernel: minutes in all


def notebook_names():
    return sorted(os.path.splitext(n)[0] for n in os.listdir(NOTEBOOKS)
                  if n.endswith(".ipynb") and not n.startswith("."))


def test_every_notebook_is_tested():
    assert sorted(EXPECTED_FIGURES) == notebook_names()


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec running this interpreter, and the environment of the notebooks."""
    base = tmp_path_factory.mktemp("notebooks")
    spec_dir = base / "kernels" / "mrcnn-notebook-test"
    spec_dir.mkdir(parents=True)
    figures = base / "figures"
    logs = base / "logs"
    env = {
        "MRCNN_NOTEBOOK_SMALL": "1",
        "MRCNN_NOTEBOOK_FIGURES": str(figures),
        "MRCNN_NOTEBOOK_LOGS": str(logs),
        "MRCNN_NOTEBOOK_TRAIN_STEPS": "0",
        "MPLBACKEND": "Agg",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p),
    }
    with open(spec_dir / "kernel.json", "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                            "{connection_file}"],
                   "display_name": "mrcnn tests", "language": "python", "env": env}, f)
    return {"kernel_dirs": [str(base / "kernels")], "kernel_name": "mrcnn-notebook-test",
            "figures": figures}


def execute(path, kernel_env, dataset_dir=None):
    """Run a notebook; dataset_dir: the value put into its `DATASET_DIR = None` cell."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    notebook = nbformat.read(path, as_version=4)
    if dataset_dir is not None:
        cells = [c for c in notebook.cells
                 if c.cell_type == "code" and "DATASET_DIR = None" in c.source]
        assert len(cells) == 1, "%s: expected one `DATASET_DIR = None` cell" % path
        cells[0].source = cells[0].source.replace("DATASET_DIR = None",
                                                  "DATASET_DIR = %r" % str(dataset_dir))
    ksm = KernelSpecManager(kernel_dirs=kernel_env["kernel_dirs"])
    km = KernelManager(kernel_name=kernel_env["kernel_name"], kernel_spec_manager=ksm)
    client = nbclient.NotebookClient(notebook, km=km, timeout=CELL_TIMEOUT,
                                     allow_errors=False,
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    return notebook


def outputs_text(notebook):
    text = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                text.append(out["text"])
            for value in out.get("data", {}).values():
                if isinstance(value, str):
                    text.append(value)
    return "\n".join(text)


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_notebook_runs(name, kernel_env):
    start = time.time()
    try:
        notebook = execute(os.path.join(NOTEBOOKS, name + ".ipynb"), kernel_env)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail("%s.ipynb: a cell failed:\n%s" % (name, str(e)[-3000:]))
    print("%s.ipynb ran in %.0f s" % (name, time.time() - start))

    text = outputs_text(notebook)
    if name != "inspect_fashion_data":
        # No checkpoint in the empty logs folder: the notebook must say it uses random weights.
        assert "Weights: RANDOM" in text, "%s.ipynb does not say which weights it uses" % name

    if name == "demo":
        # The demo's model has the attribute head: its attributes and their report are shown.
        assert "with their attributes" in text and "Attribute-aware AP" in text, \
            "demo.ipynb shows no predicted attributes"

    from PIL import Image
    for figure in EXPECTED_FIGURES[name]:
        path = kernel_env["figures"] / ("%s_%s.png" % (name, figure))
        assert path.is_file(), "%s.ipynb did not save %s" % (name, path.name)
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert pixels.size and pixels.std() > 0, "%s is blank" % path.name


def test_real_data_by_changing_one_cell(kernel_env, tmp_path):
    """demo.ipynb on a folder in iMaterialist's format that is not the demo (a copy of the demo
    data without its stamp): only the DATASET_DIR cell changes, and FashionConfig is used."""
    import shutil
    from samples.fashion import demo_data
    folder = tmp_path / "imaterialist"
    shutil.copytree(demo_data.ensure_demo_data(verbose=False), folder)
    (folder / "demo.json").unlink()
    try:
        notebook = execute(os.path.join(NOTEBOOKS, "demo.ipynb"), kernel_env,
                           dataset_dir=folder)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail("demo.ipynb with DATASET_DIR set: a cell failed:\n%s" % str(e)[-3000:])
    text = outputs_text(notebook)
    assert "Dataset: %s" % folder in text
    assert "FashionConfig" in text and "Weights: RANDOM" in text
