"""The one parser of every path and URL a user gives (--workdir, --config.data_dir, ...).

A local path has its `~` expanded; a URL must be one we can use (gs://), spelt with its two
slashes. Without this, `gs:/bucket/x` or `s3://bucket/x` silently became local directories named
`gs:` and `s3:`, and `~/mnist` a directory named `~`.
"""

from __future__ import annotations

import os
import re

from etils import epath

from mnist_flax.configs import ConfigError

URL_SCHEMES = ("gs",)  # epath speaks gs:// through gcsfs (the `gcs` extra).
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/+")  # `gs://`, `s3:/`; not `runs:1`.


class PathError(ConfigError):
    """A path that names no usable place; the message is `FLAG=TEXT: RULE`."""

    def __init__(self, flag: str, text: str, rule: str):
        super().__init__(f"{flag}={text}: {rule}")
        self.rule = rule


def parse(text: str | os.PathLike, flag: str, schemes: tuple[str, ...] = URL_SCHEMES) -> str:
    """`text` with `~` expanded, or a URL of one of `schemes`; PathError (naming `flag` and the
    spelling that works) for any other scheme, or a scheme without its two slashes."""
    text = os.fspath(text)
    if not (match := _SCHEME.match(text)):
        return os.path.expanduser(text)
    scheme, spelling = match.group(1).lower(), f"{match.group(1).lower()}://{text[match.end():]}"
    if scheme not in schemes:
        supported = " and ".join(["local paths", *(f"{s}:// URLs" for s in schemes)])
        raise PathError(flag, text, f"{scheme}:// is not supported; only {supported} are")
    if text != spelling:
        raise PathError(flag, text, f"a URL is spelt with two slashes: {flag}={spelling}")
    return text


def is_remote(text: str | os.PathLike) -> bool:
    return "://" in os.fspath(text)


def path(text: str | os.PathLike, flag: str = "--workdir") -> epath.Path:
    """`text` parsed, as an epath: absolute when local, unchanged when a URL such as gs://."""
    text = parse(text, flag)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))
