"""Where shards live: a local folder, or any fsspec URL (``s3://``, ``gs://``, ``https://``, ``file://``).

Local paths stay on the fast path (``shards.tarread`` reads each member with one ``read`` at its
offset). A URL is read sequentially (tar stream mode: no per-member seeks over the network,
memory bounded by fsspec's read-ahead block plus the largest member) through
:func:`open_stream`, which retries transient failures with backoff and reopens the object,
skipping what was already yielded, so a transfer cut mid-shard loses and duplicates nothing.

fsspec's backends are optional extras (``streamret[s3]`` = s3fs, ``streamret[gcs]`` = gcsfs,
http needs aiohttp, which Ray already brings); each is imported only when such a URL is used.
Credentials come the standard way (environment, profiles, ``AWS_ENDPOINT_URL`` for MinIO/Ceph),
never from the config; URLs are printed through :func:`redact`.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRIES = 5
BACKOFF_S = 0.5  # doubled per retry: 0.5, 1, 2, 4, 8 s

_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(url: str) -> str:
    """``url`` without the ``user:password@`` part."""
    return _CREDENTIALS.sub("***@", str(url))


def is_url(location: str | Path) -> bool:
    """A location fsspec must open (``file://`` URLs are opened as the local paths they are)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(base: str | Path, name: str) -> str:
    """``name`` under ``base``; an absolute path or URL ``name`` stands as it is (external shards)."""
    if is_url(name) or os.path.isabs(name):
        return name
    if is_url(base):
        return f"{str(base).rstrip('/')}/{name}"
    return str(local_path(base) / name)


def filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exn:
        protocol = url.split("://", 1)[0]
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol, protocol)
        raise ImportError(f"{redact(url)}: reading {protocol}:// needs its fsspec backend: pip install "
                          f"'streamret[{extra}]' ({exn})") from None


def exists(location: str | Path) -> bool:
    if not is_url(location):
        return local_path(location).exists()
    fs, path = filesystem(str(location))
    return fs.exists(path)


def read_bytes(location: str | Path) -> bytes:
    if not is_url(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(str(location))
    return retrying(lambda: fs.cat_file(path), str(location))


def write_bytes(location: str | Path, data: bytes) -> None:
    """One object (or file) with ``data``; a local file is replaced atomically."""
    if not is_url(location):
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(str(location))
    retrying(lambda: fs.pipe_file(path, data), str(location))


def upload(local: Path, location: str) -> None:
    """Put a finished local file as one object: an object is never seen half-written."""
    fs, path = filesystem(location)
    retrying(lambda: fs.put_file(str(local), path), location)


def remove(location: str) -> None:
    fs, path = filesystem(location)
    if fs.exists(path):
        fs.rm_file(path)


def transient(exn: BaseException) -> bool:
    """A failure worth retrying: the network, a timeout, throttling, a 5xx; not 'gone' or 'denied'."""
    if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exn, (ConnectionError, TimeoutError)):  # (an EOFError is a truncated object: not retried)
        return True
    name = type(exn).__name__
    text = str(exn)
    return (name in ("ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
                     "FSTimeoutError", "IncompleteReadError", "ReadTimeoutError", "EndpointConnectionError",
                     "ConnectionClosedError", "ResponseStreamingError")
            or any(code in text for code in ("SlowDown", "Throttl", "500", "502", "503", "504"))
            or isinstance(exn, OSError))


def retrying(call: Callable[[], T], what: str, retries: int = RETRIES) -> T:
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exn:  # noqa: BLE001 - classified by transient()
            if attempt == retries or not transient(exn):
                raise
            log.warning("%s: %s: %s; retry %d of %d", redact(what), type(exn).__name__, exn, attempt + 1, retries)
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def open_stream(url: str, block_size: int = 8 * 2**20):
    """A sequential binary reader of ``url``: fsspec read-ahead of ``block_size`` (ranged GETs on
    object stores), or one streamed response for http(s), which need not support ranges."""
    fs, path = filesystem(url)
    if url.split("://", 1)[0] in ("http", "https"):
        return fs.open(path, "rb", block_size=0)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def _streamed(url: str, read_members: Callable[[object], Iterator[dict]]) -> Iterator[dict]:
    with open_stream(url) as f:
        yield from read_members(f)


def resumable_members(url: str, read_members: Callable[[object], Iterator[dict]],
                      retries: int = RETRIES, cache=None) -> Iterator[dict]:
    """``read_members(file)``'s members of ``url``, exactly once each: a transfer that breaks
    mid-way is reopened (with backoff) and the members already yielded are skipped, so a flaky
    network neither loses nor repeats a sample. Not-found / denied raise at once. With ``cache``
    (``shards.cache.ShardCache``) each transfer is teed into it; only a complete one is kept."""
    done, failures = 0, 0
    while True:
        seen = 0
        try:
            members = (cache.filled(url, read_members, lambda: open_stream(url)) if cache is not None
                       else _streamed(url, read_members))
            for member in members:
                seen += 1
                if seen <= done:
                    continue
                done = seen
                yield member
            return
        except Exception as exn:  # noqa: BLE001 - classified by transient()
            if failures == retries or not transient(exn):
                raise
            failures += 1
            log.warning("%s: transfer broke after %d members (%s: %s); reopening (retry %d of %d)", redact(url),
                        done, type(exn).__name__, exn, failures, retries)
            time.sleep(BACKOFF_S * 2 ** (failures - 1))
