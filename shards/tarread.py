"""Read one tar shard on local disk: its members with one read each, grouped into samples, damage
counted and skipped. ``ShardStream`` and the Ray source both read shards through ``shard_samples``.

webdataset's ``tar_file_iterator`` reads through ``tarfile``'s stream mode, which copies every
member through a 10 KiB buffer: 1.7-4 ms per 2 MB clip on the decode bench, 7-15% of decoding a
transcoded clip. A shard on disk is seekable, so here ``tarfile`` only parses the headers and each
member's bytes are one ``read`` (0.3 ms). ``tar_members`` yields what ``tar_file_iterator`` does
(``fname``/``data`` dicts), so ``webdataset.tariterators.group_by_keys`` groups them as before.

``shard_samples`` hands every consumer one sample shape, whoever wrote the shard: ``video`` (the
bytes of whichever video member it has: mp4, mkv, webm, avi, ...) and ``json`` (streamret's
metadata: ``video_id``, ``captions``, clip window). Shards streamret packed carry that json;
shards written by others (video2dataset: ``key.mp4`` + ``key.txt`` caption + ``key.json``
metadata) are read through :class:`Members`, recorded in their index by ``shards.external``.
"""
from __future__ import annotations

import json
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import webdataset as wds

from shards.cache import ShardCache
from shards.storage import is_url, local_path, redact, resumable_members

log = logging.getLogger(__name__)

VIDEO_MEMBERS = ("mp4", "mov", "m4v", "3gp", "mkv", "webm", "avi", "mpg", "flv", "wmv")
FRAME_MEMBER = re.compile(r"^(\d+)\.jpg$")  # frame shards: <key>.0000.jpg, <key>.0001.jpg, ... (shards.frames)


def frame_member(i: int) -> str:
    return f"{i:04d}.jpg"


def frame_members(sample: dict) -> list[bytes]:
    """A grouped tar sample's JPEG frames in frame order (numeric: ``10000.jpg`` after ``9999.jpg``)."""
    found = sorted((int(m.group(1)), name) for name in sample if (m := FRAME_MEMBER.match(name)))
    return [sample[name] for _, name in found]


class ShardMembersMissing(ValueError):
    """A shard's samples lack the members its index says make a sample (not a streamret shard?)."""


@dataclass(frozen=True)
class Members:
    """Where a sample's id and captions are: ``caption_member`` (a text member such as ``txt``,
    one caption per non-blank line), else ``caption_keys`` (fields of the ``json`` member, each a
    string or a list of strings); the id is the json field ``id_key``, else the tar key. The default
    reads streamret's own json (``video_id``, ``captions``)."""

    caption_member: str = ""
    caption_keys: tuple[str, ...] = ("captions",)
    id_key: str = "video_id"
    format: str = "video"  # "frames": JPEG frame members (shards.frames) instead of one video member

    @classmethod
    def from_index(cls, index: dict) -> "Members":
        spec = index.get("members") or {}
        return cls(spec.get("caption_member", ""), tuple(spec.get("caption_keys", ("captions",))),
                   spec.get("id_key", "video_id"), index.get("format") or spec.get("format") or "video")

    def to_json(self) -> dict:
        return {"caption_member": self.caption_member, "caption_keys": list(self.caption_keys), "id_key": self.id_key,
                "format": self.format}

    def normalise(self, sample: dict) -> dict | str:
        """``{"__key__", "video" | "frames", "json", "__url__"}``, or what is missing (a short reason).
        ``video`` is the bytes of the video member; ``frames`` the JPEG frames in order."""
        if self.format == "frames":
            return self._normalise_frames(sample)
        video = next((sample[ext] for ext in VIDEO_MEMBERS if ext in sample), None)
        if video is None:
            return f"no video member (has {sorted(k for k in sample if not k.startswith('__'))})"
        meta = _json_meta(sample)
        if isinstance(meta, str):
            return meta
        captions = self.captions(sample, meta)
        if not captions:
            source = f"{self.caption_member} member" if self.caption_member else f"json field(s) {list(self.caption_keys)}"
            return f"no caption in its {source}"
        if self.caption_member or self.caption_keys != ("captions",) or self.id_key != "video_id":
            video_id = meta.get(self.id_key) if self.id_key else None
            meta = {"video_id": str(video_id) if video_id not in (None, "") else sample["__key__"], "captions": captions,
                    "start": meta.get("start"), "end": meta.get("end")}
            return {"__key__": sample["__key__"], "video": video, "json": json.dumps(meta).encode(),
                    "__url__": sample.get("__url__")}
        if "video_id" not in meta:
            return "json member has no video_id"
        return {"__key__": sample["__key__"], "video": video, "json": sample["json"], "__url__": sample.get("__url__")}

    def _normalise_frames(self, sample: dict) -> dict | str:
        frames = frame_members(sample)
        if not frames:
            return f"no frame members (has {sorted(k for k in sample if not k.startswith('__'))})"
        meta = _json_meta(sample)
        if isinstance(meta, str):
            return meta
        if "video_id" not in meta or not meta.get("captions"):
            return "json member has no video_id or no captions"
        stored = meta.get("frames")
        if not isinstance(stored, dict) or len(stored.get("indices") or []) != len(frames):
            return f"json frames entry does not list the {len(frames)} stored frames"
        return {"__key__": sample["__key__"], "frames": frames, "json": sample["json"], "__url__": sample.get("__url__")}

    def captions(self, sample: dict, meta: dict) -> list[str]:
        if self.caption_member:
            raw = sample.get(self.caption_member)
            if raw is None:
                return []
            text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
            return [line.strip() for line in text.split("\n") if line.strip()]
        found: list[str] = []
        for key in self.caption_keys:
            value = meta.get(key)
            values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            found.extend(v.strip() for v in values if isinstance(v, str) and v.strip())
        return found


def _json_meta(sample: dict) -> dict | str:
    """The sample's ``json`` member as a dict ({} when it has none), or what is wrong with it."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return "json member is not valid JSON"
    return meta if isinstance(meta, dict) else "json member is not an object"


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


def _streamed_members(f, url: str) -> Iterator[dict]:
    """Tar stream mode over a network reader: headers and data in order, no seeks."""
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            extracted = tar.extractfile(info)
            data = extracted.read() if extracted is not None else b""
            if len(data) != info.size:
                raise EOFError(f"member {info.name} is cut short: {len(data)} of {info.size} bytes")
            if _unsafe(info.name):
                log.warning("%s: member %r has an absolute or '..' path; skipped", url, info.name)
                continue
            yield {"fname": info.name, "data": data, "__url__": url}


def tar_members(path: str | Path, url: str, cache: ShardCache | None = None) -> Iterator[dict]:
    """``{"fname", "data", "__url__": url}`` for each regular file in the tar at ``path`` (a local
    path, or an fsspec URL read as a resumable stream: ``shards.storage``; from ``cache``'s local
    copy once it holds one), in order.
    A member cut short by truncation raises ``EOFError`` after the complete ones; a damaged
    header raises ``tarfile.ReadError``."""
    if is_url(path):
        cached = cache.hit(str(path)) if cache is not None else None
        if cached is None:
            yield from resumable_members(str(path), lambda f: _streamed_members(f, url), cache=cache)
            return
        path = cached
    with open(local_path(path), "rb", buffering=0) as f:
        yield from _local_members(f, path, url)


_USTAR_MAGIC = b"ustar\x00"  # POSIX ustar (what tarfile and webdataset write); GNU's "ustar  " differs


def _ustar_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a plain POSIX ustar regular-file header, or None for anything else (pax or
    GNU extensions, other member types, base-256 sizes, a bad checksum, the end-of-archive block)."""
    if header[257:263] != _USTAR_MAGIC or header[156:157] not in (b"0", b"\x00") or header[124] & 0x80:
        return None
    try:
        checksum = int(header[148:156].split(b"\x00", 1)[0].strip() or b"-1", 8)
        size = int(header[124:136].split(b"\x00", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as 8 spaces
        return None
    name = header[:100].split(b"\x00", 1)[0]
    prefix = header[345:500].split(b"\x00", 1)[0]
    name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
    return None if name.endswith("/") else (name, size)


def _local_members(f, path, url: str) -> Iterator[dict]:
    """``tar_members`` of a seekable file: plain ustar headers are parsed here (one read of 512
    bytes, one of the data), much cheaper than ``tarfile``'s header objects; the first header
    that is anything else (a pax or GNU extension, damage, the end) hands the rest of the file to
    ``tarfile`` from that offset, which reads it and fails exactly as it would have from the start.

    Why: a frame shard's clip is ~32 members (30 s at 1 fps plus its json); ``tarfile`` spent
    7.3 ms of CPU per such clip on headers, 41 % of what decoding its 12 picked JPEGs took in the
    same cProfile (60 of the decode bench's 30 s clips); after it the whole read is 16 % of it."""
    offset = read_to = 0  # the next header; where tarfile's reads would have left the file
    while True:
        f.seek(offset)
        header = f.read(512)
        member = _ustar_member(header) if len(header) == 512 else None
        if member is None:
            break
        name, size = member
        read_to, offset = offset + 512, offset + 512 + -(-size // 512) * 512
        item = _read_member(f, name, size, path, url)
        if item is not None:
            read_to += size
            yield item
    if offset and read_to != offset:  # tarfile's own check before its next header: the padding is there
        f.seek(offset - 1)
        if not f.read(1):
            raise tarfile.ReadError("unexpected end of data")
    f.seek(offset)
    with tarfile.open(fileobj=f, mode="r:") as tar:  # opened at offset: tar.offset starts there
        for info in tar:  # headers are parsed lazily, one per step
            if not info.isreg():
                continue
            f.seek(info.offset_data)
            item = _read_member(f, info.name, info.size, path, url)
            if item is not None:
                yield item
            tar.members = []  # tarfile keeps every header otherwise: a 256 MB shard holds thousands


def _read_member(f, name: str, size: int, path, url: str) -> dict | None:
    """The member ``name`` of ``size`` bytes at ``f``'s position, or None when its path is unsafe."""
    if _unsafe(name):  # never a sample of ours
        log.warning("%s: member %r has an absolute or '..' path; skipped", path, name)
        return None
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"member {name} is cut short: {len(data)} of {size} bytes")
    return {"fname": name, "data": data, "__url__": url}


def shard_samples(path: str | Path, url: str, expected: int, skipped: Callable[[str], None],
                  members: Members = Members(), cache: ShardCache | None = None) -> Iterator[dict]:
    """Complete samples (``__key__``, ``video``, ``json``, ``__url__``) of the shard at ``path``, which
    its index says holds ``expected``. Damage is logged and reported as ``skipped(kind)``, never
    raised: ``incomplete_sample`` (no video member or no captions), ``corrupt_shard`` (a truncated or
    corrupt tar: the samples before the damage are yielded, the rest skipped) and ``short_shard``
    (a tar cut exactly between members reads as a valid, shorter tar: only the index can tell)."""
    read = 0
    try:
        for sample in wds.tariterators.group_by_keys(tar_members(path, url, cache)):
            read += 1
            normal = members.normalise(sample)
            if isinstance(normal, str):
                skipped("incomplete_sample")
                log.warning("%s: sample %s: %s; skipped", path, sample.get("__key__"), normal)
                continue
            yield normal
    except Exception as exn:  # noqa: BLE001 - a damaged tar, or (remote) an object gone, denied, or unreachable
        if not isinstance(exn, (tarfile.TarError, OSError, EOFError, ValueError)) and not is_url(path):
            raise
        skipped("corrupt_shard")
        log.warning("%s: unreadable shard (%s: %s); skipped the rest of it. Run shards.index.verify_split on its "
                    "folder and re-pack the split if shards are damaged", redact(str(path)), type(exn).__name__,
                    redact(str(exn)))
        return
    if read < expected:  # (incomplete samples were read: the index counts only complete ones, so this is damage)
        skipped("short_shard")
        log.warning("%s: %d samples but its index lists %d: the file ends early (cut between members). Run "
                    "shards.index.verify_split on its folder and re-pack the split", redact(str(path)), read, expected)


def check_members(path: str | Path, members: Members, cache: ShardCache | None = None) -> None:
    """Read the first sample of the shard at ``path`` and raise :class:`ShardMembersMissing` when it
    lacks what ``members`` needs: a shard written by another tool and listed in a hand-written
    index fails here, in one line, not as a KeyError deep in a DataLoader worker. A missing or
    damaged shard is left to ``shard_samples``, which counts and skips it."""
    try:
        first = next(iter(wds.tariterators.group_by_keys(tar_members(path, str(path), cache))), None)
    except Exception:  # noqa: BLE001 - damaged, missing, unreachable: shard_samples counts and skips it
        return
    if first is None:
        return
    problem = members.normalise(first)
    if isinstance(problem, str):
        raise ShardMembersMissing(
            f"{path}: sample {first.get('__key__')}: {problem}. This shard was not packed by streamret (or its index "
            f"is hand-written): index it with `python launch/pack.py data=webdataset data.webdataset.<train|val|test>=<shards> "
            f"data.shards=<index dir>` (data.webdataset.caption_member / caption_keys say where captions are)")
