"""AlDD that drags on every ``stride``-th timestep only, spreading the drag over a longer window."""

import attrs
from attrs.validators import ge

from gooddrag.core.params import p
from gooddrag.schedules.aldd import AlDD


class StridedAlDD(AlDD):
    """Alternating drag and denoising, dragging on every stride-th timestep (stride 1 = AlDD)."""

    name = "strided-aldd"

    @attrs.frozen(kw_only=True)
    class Params(AlDD.Params):
        stride: int = p(2, "drag on every stride-th timestep", ge(1))

    def drag_indices(self, start, num_steps):
        last = min(start + self.params.drag_timesteps * self.params.stride, num_steps)
        return list(range(start, last, self.params.stride))
