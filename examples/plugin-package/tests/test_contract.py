"""The contract suite the example plugin runs against its own components."""

from gooddrag.testing import check_component
from gooddrag_example.cosine import CosineTracker
from gooddrag_example.l2_loss import L2InfoPreserving
from gooddrag_example.strided import StridedAlDD


def test_contract():
    check_component("tracker", CosineTracker)
    check_component("loss", L2InfoPreserving)
    check_component("schedule", StridedAlDD)
