"""The module named by the entry point: it registers one component of each strategy kind."""

from gooddrag.core.hookspecs import hookimpl

from gooddrag_example.cosine import CosineTracker
from gooddrag_example.l2_loss import L2InfoPreserving
from gooddrag_example.strided import StridedAlDD


@hookimpl
def gooddrag_register_trackers():
    return [CosineTracker]


@hookimpl
def gooddrag_register_losses():
    return [L2InfoPreserving]


@hookimpl
def gooddrag_register_schedules():
    return [StridedAlDD]
