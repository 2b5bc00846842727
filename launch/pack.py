"""Pack a corpus into WebDataset shards: `python launch/pack.py data=<corpus> data.root=<dir> [overrides]`.

Packs `data.train_split` and `data.test_split` into `data.shards` with `data.pack.workers` processes
(and pack-time transcode when `data.pack.transcode_short_side` > 0). A split that already has an
index is left alone unless `--force` is given. `data.pack.verify=true` (or `--verify`) re-reads every
shard of each split and checks sample counts and sha256 against the index; a mismatch exits 1 and
names the shard.

Flags parsed before Hydra: `--force` (re-pack even if packed; = data.pack.force=true), `--verify` (= data.pack.verify=true),
`--splits a,b` (pack only these splits; default: the train and test splits of the config).
Exit codes: 0 ok, 1 verification failed, 2 bad config / missing corpus (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.cli import ConfigError, compose


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the remaining Hydra overrides. Any other `--flag` is a user error."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--splits", default=None)
    known, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--")]
    if stray:
        raise ConfigError(f"unknown flag {stray[0]!r}: launch/pack.py takes Hydra overrides (key=value, e.g. "
                          "data=manifest data.root=/videos) plus --force, --verify and --splits a,b")
    if known.verify:
        rest.append("data.pack.verify=true")
    return known, rest


def check_root(data) -> None:
    """Fail before any work when the corpus is not where the config says (synthetic generates it)."""
    if data.corpus != "synthetic" and not Path(data.root).is_dir():
        raise FileNotFoundError(f"data.root={data.root} is not a directory: corpus '{data.corpus}' must be on disk "
                                f"there; pass data.root=<dir holding its videos and annotations>")


def pack(cfg, splits: list[str], force: bool) -> int:
    """Pack (unless already packed and not forced) and optionally verify each split; the exit code."""
    from shards.index import index_path, verify_split
    from shards.writer import pack_split
    from trainer.data import corpus_records, transcode_spec

    data = cfg.data
    shard_dir = Path(data.shards)
    failed: list[str] = []
    for split in splits:
        if force or not index_path(shard_dir, split).is_file():
            report = pack_split(corpus_records(data, split), shard_dir, split, shard_bytes=data.pack.shard_mb * 2**20,
                                workers=data.pack.workers, transcode=transcode_spec(data), progress=cfg.run.progress)
            print(report)
            if report.quarantined:
                print(f"{split}: quarantined rows and reasons are in {shard_dir / f'{split}.quarantine.jsonl'}")
        else:
            print(f"{split}: already packed ({index_path(shard_dir, split)}); pass --force to re-pack")
        if data.pack.verify:
            verified = verify_split(shard_dir, split)
            print(verified)
            if not verified.ok:
                failed.append(str(verified))
    if failed:
        print(f"error: verification failed: {' | '.join(failed)}; re-pack with --force", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        flags, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = compose(overrides)
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        return 2
    from trainer.errors import user_errors

    splits = flags.splits.split(",") if flags.splits else [cfg.data.train_split, cfg.data.test_split]
    with user_errors():
        check_root(cfg.data)
        return pack(cfg, [s.strip() for s in splits if s.strip()], flags.force or cfg.data.pack.force)
    return 2  # unreachable: user_errors exits


if __name__ == "__main__":
    sys.exit(main())
