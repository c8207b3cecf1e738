"""How much arithmetic each model does, and how fast this machine does float32 arithmetic.

The model-speed goal (benchmarks/RESULTS.md, "Model speed") compares seconds; this script
says whether a goal is reachable at all: the multiply-add FLOPs of one 1024 x 1024 inference
(R50, 1000 proposals, 100 detections: bench_model.py's setup) for our graph and for
torchvision's, and the float32 GFLOP/s TensorFlow reaches here on a large matmul and on the
RPN's 3x3 conv at P2. Our FLOPs divided by the best rate is the least time our graph can
take on this machine.

Counting, 2 FLOPs per multiply-add of convolutions, transposed convolutions and matrix
products (element-wise ops, a few percent, are left out on both sides). Ours: from the op
shapes of the traced predict graph, summed per stage with bench_model.op_stage. torchvision:
`torch.utils.flop_counter.FlopCounterMode` over model([image]), per top-level module.

Run from the repository root (about 30 s; torch / torchvision optional):
    /work/venv/bin/python benchmarks/bench_flops.py [--backbone resnet50] [--head fcn]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_model  # noqa: E402


def matmul_conv_flops(op, rows):
    """2 x the multiply-adds of a convolution, transposed convolution or matrix product op of
    a traced graph (0 for other ops). A leading dimension unknown at tracing (the mask head's
    ROIs, a dynamic count) is taken as `rows`."""
    def dims(tensor):
        shape = tensor.shape.as_list()
        return [rows if d is None and i == 0 else d for i, d in enumerate(shape)]
    if op.type in ("Conv2D", "Conv2DBackpropInput"):
        kernel = dims(op.inputs[1])                                   # [kh, kw, in, out]
        # Conv2D: every output pixel does kh*kw*in multiply-adds per output channel;
        # Conv2DBackpropInput (a deconv): every input pixel does kh*kw*out per kernel input.
        pixels = dims(op.outputs[0]) if op.type == "Conv2D" else dims(op.inputs[2])
        per_pixel = kernel[0] * kernel[1] * kernel[2] * kernel[3]
        count = pixels[0] * pixels[1] * pixels[2] * per_pixel
    elif op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
        a = dims(op.inputs[0])
        out = dims(op.outputs[0])
        inner = a[-2] if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x") \
            else a[-1]
        count = inner
        for d in out:
            count *= d
    else:
        return 0
    assert count is not None and count > 0, (op.name, op.type)
    return 2 * count


def our_flops(backbone, head):
    """{stage: FLOPs} of one inference of our graph at bench_model's 1024 px setup."""
    import tensorflow as tf
    from mrcnn.model import MaskRCNN
    config = bench_model.our_config("infer", backbone, head)
    model = MaskRCNN("inference", config, tempfile.mkdtemp(prefix="bench_flops_"))
    image = bench_model.photo_like_image(bench_model.INFER_SIZE, bench_model.INFER_SIZE)[0]
    molded, metas, _ = model.mold_inputs([image])
    anchors = model.get_anchors(molded[0].shape)[None]
    specs = [tf.TensorSpec(a.shape, tf.float32) for a in (molded, metas, anchors)]
    graph = tf.function(lambda *x: model.keras_model(list(x), training=False)) \
        .get_concrete_function(*specs).graph
    rows = config.DETECTION_MAX_INSTANCES     # the mask head's ROI count (all kept here)
    stages = {}
    for op in graph.get_operations():
        flops = matmul_conv_flops(op, rows)
        if flops:
            stage, _ = bench_model.op_stage(op.name)
            stages[stage] = stages.get(stage, 0) + flops
    return stages


def torchvision_flops(backbone):
    """{module: FLOPs} of one inference of torchvision's Mask R-CNN (bench_model's setup)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    model, _, _ = bench_model.tv_model("infer", backbone)
    model.eval()
    image = bench_model.photo_like_image(bench_model.INFER_SIZE, bench_model.INFER_SIZE)[0]
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
    counter = FlopCounterMode(display=False, depth=3)
    with torch.inference_mode(), counter:
        model([tensor])
    per_module = counter.get_flop_counts()
    names = {"backbone ResNet": "MaskRCNN.backbone.body", "FPN": "MaskRCNN.backbone.fpn",
             "RPN": "MaskRCNN.rpn", "heads (box + mask)": "MaskRCNN.roi_heads"}
    out = {stage: sum(per_module.get(module, {}).values()) for stage, module in names.items()}
    out["total"] = counter.get_total_flops()
    return out


def tf_rates(runs):
    """Float32 GFLOP/s of TensorFlow here: a 4096^3 matmul, the RPN conv at P2 (1024 px)."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((4096, 4096)).astype("float32"))
    x = tf.constant(rng.standard_normal((1, 256, 256, 256)).astype("float32"))
    w = tf.constant(rng.standard_normal((3, 3, 256, 512)).astype("float32") * 0.02)
    cases = {"matmul 4096^3": (tf.function(lambda: tf.matmul(a, a)), 2 * 4096 ** 3),
             "conv 3x3 256->512 at 256x256 (RPN, P2)":
                 (tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME")),
                  2 * 256 * 256 * 256 * 512 * 9)}
    rates = {}
    for name, (fn, flops) in cases.items():
        seconds = statistics.median(bench_model.time_runs(lambda: fn().numpy(), runs, 1))
        rates[name] = flops / seconds / 1e9
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet101"])
    parser.add_argument("--head", default="fcn", choices=["fcn", "unet"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peer-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_json:
        print("PEER " + json.dumps(torchvision_flops(args.backbone)))
        return
    print(bench_model.machine_info())
    ours = our_flops(args.backbone, args.head)
    total = sum(ours.values())
    print("\nours (%s, %s head), GFLOPs per 1024 px inference:"
          % (args.backbone, args.head))
    for stage in bench_model.STAGE_ORDER + sorted(set(ours) - set(bench_model.STAGE_ORDER)):
        if stage in ours:
            print("  %-28s %8.1f" % (stage, ours[stage] / 1e9))
    print("  %-28s %8.1f" % ("total", total / 1e9))
    # torch in its own process: importing it after TensorFlow ends this one silently here.
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--peer-json",
                           "--backbone", args.backbone], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEER ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print("\ntorchvision count skipped (not installed?): %s" % " / ".join(tail))
    else:
        peer = json.loads(lines[-1][len("PEER "):])
        print("\ntorchvision, GFLOPs per 1024 px inference (torch's count, convs and matmuls):")
        for stage, flops in peer.items():
            print("  %-28s %8.1f" % (stage, flops / 1e9))
        print("  ours / torchvision: %.2fx" % (total / peer["total"]))
    rates = tf_rates(args.runs)
    print("\nTensorFlow float32 rate here (median of %d):" % args.runs)
    for name, rate in rates.items():
        print("  %-40s %6.0f GFLOP/s" % (name, rate))
    best = max(rates.values())
    print("\nleast time of our graph at the best rate: %.2f s" % (total / best / 1e9))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print("(%.0f s)" % (time.perf_counter() - start))
