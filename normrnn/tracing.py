"""Code that ``torch.compile`` cannot trace, run eagerly between its graphs.

``untraced(reason, function, *args)`` calls ``function``; inside a graph that Dynamo is tracing it
first breaks the graph with ``reason`` and calls ``function`` with Dynamo disabled, so that a
compiled model runs the call eagerly between two graphs and ``fullgraph=True`` fails naming
``reason``. Dynamo is touched only while it traces (and so is loaded): a
``torch.compiler.disable`` decorator would import Dynamo, and with it Triton, with normrnn (a
second of import time, and for the Triton interpreter too early).
"""
from __future__ import annotations

import torch


def untraced(reason: str, function, *args):
    """``function(*args)``, run eagerly outside any graph ``torch.compile`` is tracing: the graph
    breaks there with ``reason`` (which ``fullgraph=True`` raises with)."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=reason)
        # where Dynamo resumes tracing after the break: not into ``function``
        return torch.compiler.disable(function)(*args)
    return function(*args)
