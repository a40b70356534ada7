"""tensorboardX, imported the one way the package imports it: without torch.

tensorboardX's writer imports torch where it is installed, only to accept torch tensors, which
nothing here passes it; that one import took longer than all of main's others together
(docs/speed.md, "Start-up"). Every use of tensorboardX in mnist_flax goes through `tensorboardx()`.
"""

from __future__ import annotations

import importlib.abc
import sys
import types


class _Hidden(importlib.abc.MetaPathFinder):
    """An import finder under which `name` and its submodules look absent."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname == self.name or fullname.startswith(f"{self.name}."):
            raise ModuleNotFoundError(f"{fullname} is hidden", name=fullname)
        return None


def tensorboardx() -> types.ModuleType:
    """tensorboardX with its writer, summaries and protos, imported (the first time) with torch
    hidden; torch stays importable as usual afterwards."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        hidden = _Hidden("torch")
        sys.meta_path.insert(0, hidden)
        try:
            import tensorboardX  # noqa: F401 (imports its writer)
        finally:
            sys.meta_path.remove(hidden)
    import tensorboardX
    import tensorboardX.proto.event_pb2
    import tensorboardX.proto.summary_pb2
    import tensorboardX.summary

    return tensorboardX
