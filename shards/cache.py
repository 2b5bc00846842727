"""A size-bounded local cache of remote shards (``data.cache_dir``), for multi-epoch runs.

A remote shard is streamed as always and its bytes are teed into a temporary file beside the
cache; only a transfer read to its end without a break is renamed into place (atomic), so a
partial file is never served. The next read of that URL is a local one (one ``read`` per
member). Past ``max_bytes`` the least recently read shards are deleted (a reader that has one
open keeps reading it: POSIX unlinks lazily). Several processes may fill the cache at once:
each writes its own temporary file and the last rename wins with identical bytes.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from shards.storage import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardCache:
    root: str
    max_bytes: int

    def path(self, url: str) -> Path:
        return Path(self.root) / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.tar"

    def hit(self, url: str) -> Path | None:
        """The complete cached copy of ``url`` (its read time refreshed for eviction), or None."""
        path = self.path(url)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def filled(self, url: str, read: Callable[[object], Iterator[dict]], open_stream: Callable[[], object]
               ) -> Iterator[dict]:
        """``read(file)``'s members of ``url`` from one remote transfer, teed into the cache. Raises
        what the transfer raises (the caller retries); the temporary file is then dropped."""
        Path(self.root).mkdir(parents=True, exist_ok=True)
        final = self.path(url)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.part")
        try:
            with open_stream() as remote, open(tmp, "wb") as local:
                tee = _Tee(remote, local)
                yield from read(tee)
                while tee.read(1 << 20):  # the tar's end padding: the cached file is the whole object
                    pass
            if os.path.getsize(tmp) > self.max_bytes:
                log.info("%s: %d bytes is more than data.cache_gb allows; not cached", redact(url), os.path.getsize(tmp))
                return
            os.replace(tmp, final)
            self.evict(keep=final)
        finally:
            tmp.unlink(missing_ok=True)

    def evict(self, keep: Path) -> None:
        """Delete the least recently read shards until the cache holds at most ``max_bytes``."""
        entries = []
        for p in Path(self.root).glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size


class _Tee:
    """A reader that copies what it reads into ``sink``."""

    def __init__(self, source, sink):
        self.source, self.sink = source, sink

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.sink.write(data)
        return data
