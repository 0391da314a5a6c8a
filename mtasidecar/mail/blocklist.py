"""Dangerous attachments: which ones we refuse to serve, and why.

A blocked attachment stays in the raw message (the raw is sacred) but the
attachment route will not hand it out. Names inside .zip files are checked
too, since that is how executables usually travel; other archives are not
opened.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/x-zip"})
# Reading a zip's directory is cheap; a huge one is not worth it.
MAX_ZIP_BYTES = 20 * 1024 * 1024
MAX_ZIP_NAMES = 10_000


@dataclass(frozen=True)
class Blocklist:
    extensions: frozenset[str]
    types: frozenset[str]

    @classmethod
    def of(cls, extensions, types) -> Blocklist:
        return cls(frozenset(e.lower().lstrip(".") for e in extensions), frozenset(t.lower() for t in types))

    def _by_name(self, name: str | None) -> bool:
        if not name or "." not in name:
            return False
        # "invoice.pdf.exe" is an .exe; trailing dots and spaces are ignored by Windows.
        return name.rstrip(". ").rsplit(".", 1)[-1].lower() in self.extensions

    def reason(self, filename: str | None, content_type: str, load) -> str | None:
        """Why this attachment is blocked, or None. ``load()`` gives its bytes (zip only)."""
        if self._by_name(filename):
            return f"file type .{filename.rstrip('. ').rsplit('.', 1)[-1].lower()} is blocked"
        if content_type.lower() in self.types:
            return f"content type {content_type} is blocked"
        is_zip = content_type.lower() in ZIP_TYPES or (filename or "").lower().endswith(".zip")
        if is_zip:
            return self._zip_reason(load)
        return None

    def _zip_reason(self, load) -> str | None:
        data = load()
        if data is None or len(data) > MAX_ZIP_BYTES:
            return None
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for i, name in enumerate(archive.namelist()):
                    if i >= MAX_ZIP_NAMES:
                        break
                    if self._by_name(name.rsplit("/", 1)[-1]):
                        return f"archive contains {name!r}, a blocked file type"
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError):
            return None  # not a readable zip: served as the opaque bytes it is
        return None
