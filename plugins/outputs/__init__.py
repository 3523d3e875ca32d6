"""Output writers of one edit: the atomic result files, and the trace, animation and progress plugins
on the event hooks. The writers are public: pass them to ``Editor.edit(..., plugins=[...])``
(see docs/api.md)::

    from gooddrag.plugins.outputs import GifWriter, ProgressDisplay, TraceWriter
"""

from gooddrag.plugins.outputs.gif import GifWriter
from gooddrag.plugins.outputs.progress import ProgressDisplay
from gooddrag.plugins.outputs.trace import TraceWriter

__all__ = ["GifWriter", "ProgressDisplay", "TraceWriter"]
