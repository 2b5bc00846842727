"""Text-to-video search over a split's shards with a trained streamret model.

    python launch/search.py --model models:/streamret@champion --shards data/synthetic/shards \
        --query "a red square moves left" [--topk 5] [--png results.png] tracking.uri=sqlite:///mlflow.db
    python launch/search.py model=models:/streamret@champion shards=<dir> query="a red square moves left"

Model flag as in ``launch/eval.py`` (``--model X`` or ``model=<URI or path>``); ``--query``/``query=``
is the text, ``--shards``/``shards=`` the shard directory (default ``data.shards``), ``--split``
the split (default ``data.test_split``). Prints rank, video id, stage-1 WTI score and the video's
first caption; ``--png PATH`` also writes a contact sheet of the top results, ``--frames`` frames
per video. Other arguments are Hydra overrides.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from trainer.launchers.cli import ConfigError, compose

USAGE = ('usage: python launch/search.py --model <models:/name@champion | run dir> --query "text" '
         "[--shards DIR] [--split S] [--topk K] [--png PATH] [--frames N] [overrides]")


@dataclasses.dataclass
class SearchArgs:
    model: str
    query: str
    shards: str | None
    split: str | None
    topk: int
    png: Path | None
    frames: int
    overrides: list[str]


def parse_args(argv: list[str]) -> SearchArgs:
    from trainer.serve.registry import pop_model_reference

    try:
        model, argv = pop_model_reference(argv)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # The brief's key=value spelling of the non-Hydra arguments.
    argv = [f"--{a}" if a.startswith(("query=", "shards=", "split=", "topk=", "png=", "frames=")) else a for a in argv]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--query")
    parser.add_argument("--shards")
    parser.add_argument("--split")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--frames", type=int, default=4)
    known, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--")]
    if stray:
        raise ConfigError(f"unknown flag {stray[0]!r}; {USAGE}")
    if not model or not known.query:
        raise ConfigError(f"{'--model' if not model else '--query'} is required; {USAGE}")
    if not known.query.strip():  # a blank query tokenises to nothing and "finds" arbitrary videos
        raise ConfigError(f"--query is blank ({known.query!r}): give the words to search for; {USAGE}")
    if known.topk < 1 or known.frames < 1:
        raise ConfigError(f"--topk ({known.topk}) and --frames ({known.frames}) must be >= 1")
    if known.shards:
        rest.append(f"data.shards={known.shards}")
    return SearchArgs(model, known.query, known.shards, known.split, known.topk,
                      known.png.resolve() if known.png else None, known.frames, rest)


def collect_frames(loader, wanted: set[str], n_frames: int) -> dict:
    """uint8 [n, S, S, 3] frames (evenly spaced real frames) of the videos in ``wanted``; the
    loader ships uint8 (``trainer.components.data.eval_loader``), so these are the model's pixels before normalising."""
    import torch

    found = {}
    for batch in loader:
        for video, mask, video_id in zip(batch["video"], batch["video_mask"], batch["video_id"]):
            if video_id in wanted and video_id not in found:
                real = video[mask]
                pick = torch.linspace(0, real.shape[0] - 1, min(n_frames, real.shape[0])).round().long()
                found[video_id] = real[pick].permute(0, 2, 3, 1).numpy()
        if len(found) == len(wanted):
            break
    return found


def contact_sheet(path: Path, rows: list[dict], frames: dict, query: str, n_frames: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), n_frames, figsize=(1.8 * n_frames, 1.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        clip = frames.get(row["video_id"], [])
        for c in range(n_frames):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(clip):
                ax.imshow(clip[c])
        axes[r][0].set_title(f"#{row['rank']} {row['video_id']}  {row['score']:.3f}", fontsize=8, loc="left")
    fig.suptitle(f"query: {query}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_search(args: SearchArgs, dcfg) -> list[dict]:
    import torch
    from omegaconf import OmegaConf

    from shards.index import read_index
    from shards.tokenize import CaptionTokenizer
    from trainer.components.data import eval_loader
    from trainer.components.features import encode_split
    from trainer.serve.registry import load_bundle

    cfg = OmegaConf.to_object(dcfg)
    device = torch.device("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    bundle = load_bundle(args.model, tracking_uri=cfg.tracking.uri).to(device)
    s = bundle.settings
    data = dataclasses.replace(cfg.data, max_frames=bundle.max_frames, max_words=s.max_words, sample_fps=s.sample_fps)
    split = args.split or data.test_split
    read_index(data.shards, split)
    tokenizer = CaptionTokenizer(data.max_words)
    bank = encode_split(bundle.encoder, eval_loader(data, bundle.model_config, split), tokenizer, device,
                        torch.float32, f"encode {split}", cfg.run.progress)
    ids, mask = tokenizer([args.query])
    with torch.no_grad():
        query = bundle.encoder.encode_text(ids.to(device), mask.to(device))
        scores = bundle.encoder.similarity(query, bank.video())[0]
    top = scores.topk(min(args.topk, bank.num_videos))
    first_caption = {}
    for caption, video in zip(bank.captions, bank.text_to_video.tolist()):
        first_caption.setdefault(video, caption)
    rows = [{"rank": r + 1, "video_id": bank.video_ids[i], "score": float(v), "caption": first_caption.get(i, "")}
            for r, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]
    width = max(len(r["video_id"]) for r in rows)
    print(f'\nquery: "{args.query}"  ({args.model}; {data.shards} {split}, {bank.num_videos} videos)')
    print(f"{'rank':>4}  {'video':<{width}}  {'score':>7}  caption")
    for r in rows:
        print(f"{r['rank']:>4}  {r['video_id']:<{width}}  {r['score']:>7.4f}  {r['caption']}")
    if args.png:
        frames = collect_frames(eval_loader(data, bundle.model_config, split), {r["video_id"] for r in rows},
                                args.frames)
        print(f"contact sheet: {contact_sheet(args.png, rows, frames, args.query, args.frames)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    from trainer.launchers.errors import run_entry_point

    def load():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return args, compose(args.overrides)

    return run_entry_point(load, lambda loaded: run_search(*loaded))


if __name__ == "__main__":
    sys.exit(main())
