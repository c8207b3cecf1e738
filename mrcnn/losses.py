"""The five Mask R-CNN losses, with matterport's names, arguments and semantics.

    rpn_class_loss_graph     anchor fg/bg cross-entropy; neutral anchors (rpn_match 0) ignored
    rpn_bbox_loss_graph      smooth L1 of positive anchors' deltas
    mrcnn_class_loss_graph   ROI class cross-entropy; predictions of classes that are not
                             active in the image's dataset do not count
    mrcnn_bbox_loss_graph    smooth L1 of positive ROIs' deltas for their true class
    mrcnn_mask_loss_graph    binary cross-entropy of positive ROIs' masks for their true class
    mrcnn_attribute_loss_graph  (NUM_ATTRIBUTES > 0 only) sigmoid cross-entropy of positive
                             ROIs' attributes (multi-label)

Each casts its inputs to float32 (mixed precision), returns a float32 scalar, and returns 0
(not NaN) when there is nothing to average. They use masks and fixed shapes instead of
matterport's tf.where/gather on dynamic shapes: the same values, but no dynamic shapes.

Each loss is a masked mean over the whole batch, sum / count, and is built from a `*_sum_count`
twin returning that (sum, count) pair (float32 scalars). Training under a distribution
strategy uses the pairs: every replica divides its own sum by the count all-reduced over the
replicas, so that the replicas' gradients add up to the gradient of the global-batch mean
(see MaskRCNNTrainingModel.train_step). The mean of a replica's own images would weight the
replicas equally whatever their counts of anchors and positive ROIs.
"""

import tensorflow as tf

# Clip of predicted probabilities in the binary cross-entropy (Keras' epsilon).
EPSILON = 1e-7


def smooth_l1_loss(y_true, y_pred):
    """Element-wise smooth L1 (Huber with delta 1): 0.5 d^2 if |d| < 1 else |d| - 0.5.

    y_true, y_pred: same shape, any rank. Returns that shape, float32.
    """
    diff = tf.abs(tf.cast(y_true, tf.float32) - tf.cast(y_pred, tf.float32))
    less_than_one = tf.cast(diff < 1.0, tf.float32)
    return less_than_one * 0.5 * diff ** 2 + (1.0 - less_than_one) * (diff - 0.5)


def _masked_sum_count(values, weights):
    """(sum(values * weights), sum(weights)): float32 scalars."""
    return tf.reduce_sum(values * weights), tf.reduce_sum(weights)


def masked_mean(sum_count):
    """sum / count of a (sum, count) pair, or 0 when the count is 0."""
    total, count = sum_count
    return tf.math.divide_no_nan(total, count)


def _squeeze_match(rpn_match):
    """rpn_match [batch, anchors, 1] or [batch, anchors] -> int32 [batch, anchors]."""
    rpn_match = tf.cast(rpn_match, tf.int32)
    if rpn_match.shape.rank == 3:
        rpn_match = tf.squeeze(rpn_match, -1)
    return rpn_match


def rpn_class_loss_graph(rpn_match, rpn_class_logits):
    """RPN anchor classifier loss.

    rpn_match: [batch, anchors, 1] anchor match type: 1 positive, -1 negative, 0 neutral
    rpn_class_logits: [batch, anchors, 2] logits (bg, fg)
    Returns the mean cross-entropy over the non-neutral anchors (0 if there are none).
    """
    return masked_mean(rpn_class_loss_sum_count(rpn_match, rpn_class_logits))


def rpn_class_loss_sum_count(rpn_match, rpn_class_logits):
    """rpn_class_loss_graph as (sum of the cross-entropies, number of non-neutral anchors)."""
    rpn_match = _squeeze_match(rpn_match)                             # [batch, anchors]
    rpn_class_logits = tf.cast(rpn_class_logits, tf.float32)         # [batch, anchors, 2]
    anchor_class = tf.cast(tf.equal(rpn_match, 1), tf.int32)         # [batch, anchors]
    valid = tf.cast(tf.not_equal(rpn_match, 0), tf.float32)          # [batch, anchors]
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=anchor_class, logits=rpn_class_logits)                 # [batch, anchors]
    return _masked_sum_count(loss, valid)


def rpn_bbox_loss_graph(config, target_bbox, rpn_match, rpn_bbox):
    """RPN bounding box loss.

    config: the Config (kept for matterport's signature; the batch size is read from the
        tensors, so this works with any per-replica batch)
    target_bbox: [batch, max positive anchors (RPN_TRAIN_ANCHORS_PER_IMAGE), 4] deltas of the
        positive anchors, in anchor order, zero-padded
    rpn_match: [batch, anchors, 1] 1 positive, -1 negative, 0 neutral
    rpn_bbox: [batch, anchors, 4] predicted deltas
    Returns the mean smooth L1 over the coordinates of the positive anchors (0 if none).
    """
    return masked_mean(rpn_bbox_loss_sum_count(config, target_bbox, rpn_match, rpn_bbox))


def rpn_bbox_loss_sum_count(config, target_bbox, rpn_match, rpn_bbox):
    """rpn_bbox_loss_graph as (sum of the smooth L1 terms, 4 x number of positive anchors)."""
    del config
    rpn_match = _squeeze_match(rpn_match)                             # [batch, anchors]
    target_bbox = tf.cast(target_bbox, tf.float32)                   # [batch, max_pos, 4]
    rpn_bbox = tf.cast(rpn_bbox, tf.float32)                         # [batch, anchors, 4]
    positive = tf.equal(rpn_match, 1)                                 # [batch, anchors]
    # The k-th positive anchor of an image has its target in row k of target_bbox.
    rank = tf.cumsum(tf.cast(positive, tf.int32), axis=1) - 1        # [batch, anchors]
    max_pos = tf.shape(target_bbox)[1]
    valid = tf.logical_and(positive, rank < max_pos)                  # [batch, anchors]
    rank = tf.clip_by_value(rank, 0, tf.maximum(max_pos - 1, 0))
    target = tf.gather(target_bbox, rank, axis=1, batch_dims=1)      # [batch, anchors, 4]
    loss = smooth_l1_loss(target, rpn_bbox)                           # [batch, anchors, 4]
    weights = tf.tile(tf.cast(valid, tf.float32)[..., None], [1, 1, 4])
    return _masked_sum_count(loss, weights)


def mrcnn_class_loss_graph(target_class_ids, pred_class_logits, active_class_ids):
    """Classifier head loss.

    target_class_ids: [batch, num_rois] int class ids, zero-padded (padding counts as
        background, as in matterport)
    pred_class_logits: [batch, num_rois, num_classes]
    active_class_ids: [batch, num_classes] 1 for the classes of the image's dataset, else 0
    Returns the mean cross-entropy over the ROIs whose predicted (argmax) class is active in
    their image (0 if none). Matterport uses the first image's active classes for the whole
    batch; this uses each image's own, the same when all images come from one dataset.
    """
    return masked_mean(mrcnn_class_loss_sum_count(target_class_ids, pred_class_logits,
                                                  active_class_ids))


def mrcnn_class_loss_sum_count(target_class_ids, pred_class_logits, active_class_ids):
    """mrcnn_class_loss_graph as (sum of the cross-entropies, number of ROIs counted)."""
    target_class_ids = tf.cast(target_class_ids, tf.int32)           # [batch, num_rois]
    pred_class_logits = tf.cast(pred_class_logits, tf.float32)       # [batch, num_rois, classes]
    active_class_ids = tf.cast(active_class_ids, tf.float32)         # [batch, classes]
    pred_class_ids = tf.argmax(pred_class_logits, axis=2, output_type=tf.int32)
    #                                                                   [batch, num_rois]
    pred_active = tf.gather(active_class_ids, pred_class_ids, axis=1, batch_dims=1)
    #                                                                   [batch, num_rois]
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=target_class_ids, logits=pred_class_logits)            # [batch, num_rois]
    return _masked_sum_count(loss, pred_active)


def mrcnn_bbox_loss_graph(target_bbox, target_class_ids, pred_bbox):
    """Box refinement loss of the classifier head.

    target_bbox: [batch, num_rois, 4] target deltas
    target_class_ids: [batch, num_rois] int, 0 for negative / padded ROIs
    pred_bbox: [batch, num_rois, num_classes, 4]
    Returns the mean smooth L1 over the coordinates of the positive ROIs, using the deltas
    predicted for each ROI's true class (0 if there are no positive ROIs).
    """
    return masked_mean(mrcnn_bbox_loss_sum_count(target_bbox, target_class_ids, pred_bbox))


def mrcnn_bbox_loss_sum_count(target_bbox, target_class_ids, pred_bbox):
    """mrcnn_bbox_loss_graph as (sum of the smooth L1 terms, 4 x number of positive ROIs)."""
    target_class_ids = tf.cast(target_class_ids, tf.int32)           # [batch, num_rois]
    target_bbox = tf.cast(target_bbox, tf.float32)                   # [batch, num_rois, 4]
    pred_bbox = tf.cast(pred_bbox, tf.float32)                       # [batch, num_rois, classes, 4]
    # Deltas predicted for the true class of each ROI.
    pred = tf.gather(pred_bbox, target_class_ids, axis=2, batch_dims=2)
    #                                                                   [batch, num_rois, 4]
    positive = tf.cast(target_class_ids > 0, tf.float32)             # [batch, num_rois]
    loss = smooth_l1_loss(target_bbox, pred)                          # [batch, num_rois, 4]
    weights = tf.tile(positive[..., None], [1, 1, 4])                 # [batch, num_rois, 4]
    return _masked_sum_count(loss, weights)


def mrcnn_mask_loss_graph(target_masks, target_class_ids, pred_masks):
    """Mask head loss.

    target_masks: [batch, num_rois, height, width] 0/1 (bool, int or float)
    target_class_ids: [batch, num_rois] int, 0 for negative / padded ROIs
    pred_masks: [batch, num_rois, height, width, num_classes] probabilities in [0, 1]
    Returns the mean binary cross-entropy over the pixels of the positive ROIs, using each
    ROI's mask for its true class (0 if there are no positive ROIs).
    """
    return masked_mean(mrcnn_mask_loss_sum_count(target_masks, target_class_ids, pred_masks))


def mrcnn_mask_loss_sum_count(target_masks, target_class_ids, pred_masks):
    """mrcnn_mask_loss_graph as (sum of the pixel cross-entropies, height x width x number of
    positive ROIs)."""
    target_class_ids = tf.cast(target_class_ids, tf.int32)           # [batch, num_rois]
    target_masks = tf.cast(target_masks, tf.float32)                 # [batch, num_rois, h, w]
    pred_masks = tf.cast(pred_masks, tf.float32)                     # [batch, num_rois, h, w, classes]
    # Mask predicted for the true class of each ROI.
    pred = tf.gather(pred_masks, target_class_ids, axis=4, batch_dims=2)
    #                                                                   [batch, num_rois, h, w]
    pred = tf.clip_by_value(pred, EPSILON, 1.0 - EPSILON)
    bce = -(target_masks * tf.math.log(pred)
            + (1.0 - target_masks) * tf.math.log(1.0 - pred))         # [batch, num_rois, h, w]
    positive = tf.cast(target_class_ids > 0, tf.float32)             # [batch, num_rois]
    weights = tf.ones_like(bce) * positive[:, :, None, None]          # [batch, num_rois, h, w]
    return _masked_sum_count(bce, weights)


def mrcnn_attribute_loss_graph(target_attributes, target_class_ids, pred_attribute_logits):
    """Attribute head loss (Attribute-Mask R-CNN; NUM_ATTRIBUTES > 0).

    target_attributes: [batch, num_rois, num_attributes] 0/1 multi-hot (the attributes of
        each positive ROI's instance; ignored for the others)
    target_class_ids: [batch, num_rois] int, 0 for negative / padded ROIs
    pred_attribute_logits: [batch, num_rois, num_attributes] logits
    Returns the mean sigmoid cross-entropy over (positive ROI, attribute) pairs (0 if there
    are no positive ROIs).
    """
    return masked_mean(mrcnn_attribute_loss_sum_count(target_attributes, target_class_ids,
                                                      pred_attribute_logits))


def mrcnn_attribute_loss_sum_count(target_attributes, target_class_ids, pred_attribute_logits):
    """mrcnn_attribute_loss_graph as (sum of the sigmoid cross-entropies, number of positive
    ROIs x num_attributes): each (positive ROI, attribute) pair is one term, as each pixel
    is in the mask loss."""
    target_class_ids = tf.cast(target_class_ids, tf.int32)           # [batch, num_rois]
    targets = tf.cast(target_attributes, tf.float32)                 # [batch, num_rois, attrs]
    logits = tf.cast(pred_attribute_logits, tf.float32)              # [batch, num_rois, attrs]
    # The targets may have more rows than the head ran on (or fewer): the first rows align.
    rows = tf.minimum(tf.shape(targets)[1], tf.shape(logits)[1])
    targets, logits = targets[:, :rows], logits[:, :rows]
    target_class_ids = target_class_ids[:, :rows]
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    positive = tf.cast(target_class_ids > 0, tf.float32)             # [batch, rows]
    weights = tf.ones_like(bce) * positive[:, :, None]                # [batch, rows, attrs]
    return _masked_sum_count(bce, weights)


def batch_pack_graph(x, counts, num_rows):
    """The first counts[i] rows of x[i] for each i < num_rows, concatenated (matterport's
    helper). x: [batch, N, ...]; counts: [batch] int. Returns [sum(counts[:num_rows]), ...].
    """
    return tf.concat([x[i, :counts[i]] for i in range(num_rows)], axis=0)
