"""Distribution: the tf.distribute strategy of a config, TF_CONFIG, and sharded input.

- make_strategy(config): one device, MirroredStrategy over GPU_COUNT devices, or, with a
  TF_CONFIG naming several workers, MultiWorkerMirroredStrategy.
- worker_info(strategy): (workers, this worker's index, is chief); only the chief writes.
- check_workers_agree: every worker must start from the same weights.
- worker_input: each worker loads only its own share of an endless DataGenerator stream.

How losses and gradients are reduced across replicas is the training step's business
(mrcnn.training.MaskRCNNTrainingModel).
"""

import json
import os
import zlib

import keras
import numpy as np
import tensorflow as tf

from mrcnn.config import ConfigError

class _ShardedStream(keras.utils.PyDataset):
    """Batches index, index + count, index + 2 count, ... of an endless PyDataset (a
    DataGenerator with stream=True), with the same loader settings."""

    def __init__(self, stream, index, count):
        super().__init__(workers=stream.workers, use_multiprocessing=stream.use_multiprocessing,
                         max_queue_size=stream.max_queue_size)
        self.stream, self.index, self.count = stream, int(index), int(count)

    @property
    def num_batches(self):
        return None

    def __getitem__(self, i):
        return self.stream[int(i) * self.count + self.index]

    def on_epoch_end(self):
        self.stream.on_epoch_end()



def cluster_from_tf_config(environ=None):
    """The cluster of the TF_CONFIG environment variable: (workers, task_type, task_index),
    workers counting the "chief" and "worker" tasks; (1, None, None) without TF_CONFIG."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not text.strip():
        return 1, None, None
    try:
        tf_config = json.loads(text)
    except ValueError as e:
        raise ConfigError("TF_CONFIG is not valid JSON (%s): %r" % (e, text[:200])) from None
    cluster = tf_config.get("cluster", {})
    task = tf_config.get("task", {})
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    return workers, task.get("type"), task.get("index")


_MULTI_WORKER_STRATEGIES = {}


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_info(strategy):
    """(workers, worker index, is chief) of a strategy: (1, 0, True) but for a
    MultiWorkerMirroredStrategy. The chief is the "chief" task, or worker 0 when the cluster
    has none (TensorFlow's rule); it alone writes logs and checkpoints."""
    if not is_multi_worker(strategy):
        return 1, 0, True
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    has_chief = bool(spec.get("chief"))
    workers = len(spec.get("chief", [])) + len(spec.get("worker", []))
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    index = 0 if task_type == "chief" else task_id + int(has_chief)
    return workers, index, chief


def make_strategy(config):
    """The tf.distribute strategy for this process.

    - TF_CONFIG naming more than one worker ("chief" and "worker" tasks): a
      MultiWorkerMirroredStrategy over all of them (one per process, made once and reused;
      TF_CONFIG must be set before). Each worker trains on all its visible GPUs, which must
      be GPU_COUNT of them (one CPU replica on a machine without a GPU: GPU_COUNT = 1).
    - Otherwise, GPU_COUNT > 1: a MirroredStrategy over that many GPUs (or logical devices);
      one: the default strategy.
    The global batch is IMAGES_PER_GPU x the number of replicas in sync.
    """
    workers, task_type, _ = cluster_from_tf_config()
    if workers > 1:
        if task_type not in ("chief", "worker"):
            raise ConfigError("TF_CONFIG: this task is a %r; MultiWorkerMirroredStrategy "
                              "trains on 'chief' and 'worker' tasks only" % (task_type,))
        key = os.environ["TF_CONFIG"]
        strategy = _MULTI_WORKER_STRATEGIES.get(key)
        if strategy is None:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            _MULTI_WORKER_STRATEGIES[key] = strategy
        local = strategy.num_replicas_in_sync // workers
        if local != config.GPU_COUNT:
            raise ConfigError(
                "GPU_COUNT=%d but this worker trains on %d device(s) (MultiWorkerMirroredStrategy "
                "uses every visible GPU, or one CPU without a GPU): set GPU_COUNT=%d or "
                "CUDA_VISIBLE_DEVICES" % (config.GPU_COUNT, local, local))
        return strategy
    if config.GPU_COUNT <= 1:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU")
    if len(devices) < config.GPU_COUNT:
        devices = tf.config.list_logical_devices("CPU")
    if len(devices) < config.GPU_COUNT:
        raise ConfigError("GPU_COUNT=%d but only %d devices are visible"
                          % (config.GPU_COUNT, len(devices)))
    return tf.distribute.MirroredStrategy([d.name for d in devices[:config.GPU_COUNT]])


def check_workers_agree(strategy, keras_model):
    """Raise ConfigError on every worker unless all workers hold the same weights.

    MultiWorkerMirroredStrategy makes the chief's initial values everyone's, but weights
    loaded afterwards (load_weights) are each worker's own: workers that loaded different
    files would all-reduce their updates yet keep training different models.
    """
    crc = 0
    for w in keras_model.get_weights():
        crc = zlib.crc32(np.ascontiguousarray(w).tobytes(), crc)
    mine = tf.constant([crc], tf.int64)
    every = strategy.gather(strategy.run(lambda: tf.identity(mine)), axis=0)
    every = sorted(set(int(v) for v in np.asarray(every)))
    if len(every) > 1:
        raise ConfigError("the workers hold different weights (%d distinct versions): load "
                          "the same weights file on every worker" % len(every))


def worker_input(strategy, generator, config, feeds):
    """A DataGenerator stream as this worker's share of a multi-worker input.

    Keras' own distribution of a PyDataset treats each batch as the global batch and cuts
    it between the replicas of all workers (every worker loading all of it); here each
    worker loads only its own batches (input pipeline i of n takes batches i, i + n, ...)
    of IMAGES_PER_GPU x GPU_COUNT images, split between its local replicas, through Keras'
    loader (its worker processes included). The Keras adapters are appended to `feeds`:
    call their on_epoch_end() to stop their loaders.
    """
    # Private Keras API: Keras 3 has no public way to turn a PyDataset into a tf.data
    # pipeline with its worker processes; tests/test_keras_private.py fails if it moves.
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    per_replica = config.IMAGES_PER_GPU

    def dataset_fn(context):
        feed = PyDatasetAdapter(_ShardedStream(generator, context.input_pipeline_id,
                                               context.num_input_pipelines))
        feeds.append(feed)
        dataset = feed.get_tf_dataset()
        if config.GPU_COUNT > 1:
            dataset = dataset.unbatch().batch(per_replica, drop_remainder=True)
        return dataset

    return strategy.distribute_datasets_from_function(dataset_fn)
