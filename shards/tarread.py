"""Members of a tar shard on local disk, one read per member.

webdataset's ``tar_file_iterator`` reads through ``tarfile``'s stream mode, which copies every
member through a 10 KiB buffer: 1.7-4 ms per 2 MB clip on the decode bench, 7-15% of decoding a
transcoded clip. A shard on disk is seekable, so here ``tarfile`` only parses the headers and each
member's bytes are one ``read`` (0.3 ms). Output matches ``tar_file_iterator`` (``fname``/``data``
dicts), so ``webdataset.tariterators.group_by_keys`` groups them into samples as before.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator


def tar_members(path: str | Path, url: str) -> Iterator[dict]:
    """``{"fname", "data", "__url__": url}`` for each regular file in the tar at ``path``, in order.
    A member cut short by truncation raises ``EOFError`` after the complete ones; a damaged
    header raises ``tarfile.ReadError`` (the callers count both and skip the rest of the shard)."""
    with open(path, "rb", buffering=0) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:  # headers are parsed lazily, one per step
            if not info.isreg():
                continue
            f.seek(info.offset_data)
            data = f.read(info.size)
            if len(data) != info.size:
                raise EOFError(f"member {info.name} is cut short: {len(data)} of {info.size} bytes")
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # tarfile keeps every header otherwise: a 256 MB shard holds thousands
