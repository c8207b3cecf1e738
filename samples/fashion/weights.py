"""The fashion sample's starting weights: matterport's COCO model and ImageNet ResNets.

They are not specific to fashion and live in mrcnn.pretrained; this module keeps the
sample's historical import path (`from samples.fashion import weights as W`).
"""

from mrcnn.pretrained import *  # noqa: F401,F403
from mrcnn.pretrained import __all__  # noqa: F401
