"""Output writers of one edit: the atomic result files, and the trace, animation and progress plugins
on the event hooks. The writers are public: pass them to ``Editor.edit(..., plugins=[...])``
(see docs/api.md)::

    from gooddrag.app.outputs import GifWriter, ProgressDisplay, TraceWriter
"""

from gooddrag.app.outputs.gif import GifWriter
from gooddrag.app.outputs.progress import ProgressDisplay
from gooddrag.app.outputs.trace import TraceWriter

__all__ = ["GifWriter", "ProgressDisplay", "TraceWriter"]
