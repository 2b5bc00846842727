"""Pack a corpus into WebDataset shards: `python launch/pack.py data=<corpus> data.root=<dir> [overrides]`.

Packs `data.train_split` and `data.test_split` into `data.shards` with `data.pack.workers` processes
(and pack-time transcode when `data.pack.transcode_short_side` > 0). Every split's annotations are
read before any split is written; a split that packs nothing or loses more than
`data.pack.max_quarantine` of its rows is refused (exit 2, no index written).

Existing WebDataset shards (video2dataset: key.mp4 + key.txt + key.json) are indexed in place, not
repacked: `python launch/pack.py data=webdataset data.webdataset.train='/d/{00000..00099}.tar'
data.webdataset.test=... data.shards=/d/index`; then `launch/train.py data=webdataset
data.shards=/d/index` trains from them. A split that already has an
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

from trainer.launchers.cli import ConfigError, compose


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
    """Fail before any work when the corpus is not where the config says (generated corpora are made)."""
    from trainer.components.data import GENERATED

    if data.corpus == "webdataset":  # existing shards are indexed where they are: data.webdataset.train|val|test
        return
    if not data.root:
        raise FileNotFoundError(f"data.root is unset: pass data.root=<dir holding corpus '{data.corpus}'s annotations "
                                f"and videos>")
    if data.corpus not in GENERATED and not Path(data.root).is_dir():
        raise FileNotFoundError(f"data.root={data.root} is not a directory: corpus '{data.corpus}' must be on disk "
                                f"there; pass data.root=<dir holding its videos and annotations>")


def pack(cfg, splits: list[str], force: bool) -> int:
    """Pack (unless already packed and not forced) and optionally verify each split; the exit code."""
    from shards.storage import join, redact
    from trainer.components.data import pack_corpus

    data, failed = cfg.data, []
    for outcome in pack_corpus(data, splits, progress=cfg.run.progress, force=force):
        split = outcome.split
        if outcome.report is None:
            print(f"{split}: already packed ({redact(join(data.shards, f'{split}.index.json'))}); pass --force to re-pack")
        else:
            print(outcome.report)
            if outcome.report.quarantined:
                print(f"{split}: quarantined rows and reasons are in {redact(join(data.shards, f'{split}.quarantine.jsonl'))}")
        if outcome.verified is not None:
            print(outcome.verified)
            if not outcome.verified.ok:
                failed.append(str(outcome.verified))
    if failed:
        print(f"error: verification failed: {' | '.join(failed)}; re-pack with --force", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from trainer.launchers.errors import run_entry_point

    def load():
        flags, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        return flags, compose(overrides)

    def body(loaded) -> int:
        flags, cfg = loaded
        splits = flags.splits.split(",") if flags.splits else [cfg.data.train_split, cfg.data.test_split]
        check_root(cfg.data)
        return pack(cfg, [s.strip() for s in splits if s.strip()], flags.force or cfg.data.pack.force)

    return run_entry_point(load, body)


if __name__ == "__main__":
    sys.exit(main())
