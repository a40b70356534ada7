"""tensorboardX, imported the one way the package imports it: without torch or the GCS client.

tensorboardX's writer imports torch where it is installed, only to accept torch tensors, which
nothing here passes it; that one import took longer than all of main's others together
(docs/speed.md, "Start-up"). It also imports google-cloud-storage where installed (the `tpu` and
`gcs` extras), which only its gs:// event files use: `tensorboardx(gcs=True)` imports it for a
gs:// workdir. Every use of tensorboardX in mnist_flax goes through `tensorboardx()`.
"""

from __future__ import annotations

import importlib.abc
import sys
import types

# What tensorboardX imports only for what we never ask of it (see above).
HIDDEN = ("torch", "google.cloud.storage")


class _Hidden(importlib.abc.MetaPathFinder):
    """An import finder under which `names` and their submodules look absent."""

    def __init__(self, names: list[str]):
        self.names = names

    def find_spec(self, fullname: str, path=None, target=None):
        if any(fullname == name or fullname.startswith(f"{name}.") for name in self.names):
            raise ModuleNotFoundError(f"{fullname} is hidden", name=fullname)
        return None


def tensorboardx(gcs: bool = False) -> types.ModuleType:
    """tensorboardX with its writer, summaries and protos, imported (the first time) with torch
    and the GCS client hidden; both stay importable as usual afterwards. `gcs`: its gs:// event
    files work (the GCS client imported and handed to tensorboardX's record writer)."""
    if "tensorboardX" not in sys.modules:
        hidden = _Hidden([name for name in HIDDEN if name not in sys.modules])
        sys.meta_path.insert(0, hidden)
        try:
            import tensorboardX  # noqa: F401 (imports its writer)
        finally:
            sys.meta_path.remove(hidden)
    import tensorboardX
    import tensorboardX.proto.event_pb2
    import tensorboardX.proto.summary_pb2
    import tensorboardX.record_writer
    import tensorboardX.summary

    if gcs and not tensorboardX.record_writer.GCS_ENABLED:
        from google.cloud import storage  # The gcs extra; its absence is one line upstream.

        tensorboardX.record_writer.storage = storage
        tensorboardX.record_writer.GCS_ENABLED = True
    return tensorboardX
