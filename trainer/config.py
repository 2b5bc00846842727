"""The typed configuration tree: every key and every default is declared here, once.

Defaults are the reference's (method.md: ViT-B/32, 12 frames, 32 words, 1 fps; the training
schedule of the papers). ``conf/`` holds only what a group option changes against them (the
embedded synthetic job, the tiny model, a long-video corpus, ZeRO-2, ...): a test fails on a YAML
value equal to its default and on a YAML key declared nowhere here. Hydra validates every file
and override against these dataclasses, so an undeclared key is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from trainer.models.config import ModelConfig


@dataclass
class SyntheticConfig:
    """The generated corpora (``data.corpus=synthetic`` or ``counting``): their sizes."""

    n_train: int = 640
    n_val: int = 0  # carved from the n_train: the val split (data.val_split) for choosing settings
    n_test: int = 96
    size: int = 64
    fps: int = 8
    seconds: float = 4.0
    captions_per_video: int = 2
    seed: int = 0


class PackFormat(str, Enum):
    """What a sample stores: its video bytes (decord decodes at train time), or its frames at
    ``frames_fps`` as JPEGs (decoded ~10x cheaper: ``shards.frames``)."""

    video = "video"
    frames = "frames"


@dataclass
class PackConfig:
    format: PackFormat = PackFormat.video
    frames_fps: float = 1.0  # format=frames: frames stored per second of video (the reference samples 1 fps)
    frames_short_side: int = 224  # format=frames: short side of the stored JPEGs (never upscaled)
    frames_quality: int = 90  # format=frames: JPEG quality
    frames_center_crop: bool = True  # format=frames: store only the centre square that training crops to
    shard_mb: int = 256
    workers: int = 2  # probe/transcode processes; 0 = in-process
    ray_address: str = ""  # probe/transcode as Ray tasks instead: "auto" (running cluster), "local", or an address
    transcode_short_side: int = 0  # 0 = keep the original bytes
    transcode_fps: float = 0.0
    transcode_gop: int = 0
    transcode_fastdecode: bool = True  # x264 tune=fastdecode: ~1.7x faster decord decode, ~14% larger
    verify: bool = False
    force: bool = False  # re-pack splits that already have shards
    # A split that loses more than this share of its rows (videos missing, unreadable, ...) is
    # refused, no index written: a quarter gone is a wrong path, not a few dead YouTube links.
    max_quarantine: float = 0.25


@dataclass
class WebDatasetConfig:
    """``data.corpus=webdataset``: existing WebDataset video shards (video2dataset's ``key.mp4`` +
    ``key.txt`` + ``key.json``), indexed in place by ``launch/pack.py`` into ``data.shards``."""

    # The shards of data.train_split / data.val_split / data.test_split: paths, brace patterns
    # ('/d/{00000..00099}.tar', quoted inside the override: Hydra reserves braces), comma-separated lists
    train: str = ""
    val: str = ""
    test: str = ""
    caption_member: str = "txt"  # one caption per line; "" = captions from the json fields below
    caption_keys: list[str] = field(default_factory=lambda: ["caption"])
    id_key: str = ""  # json field holding the video id; "" = the tar key


@dataclass
class DataConfig:
    corpus: str = "synthetic"  # synthetic | counting | manifest | webdataset | msrvtt | activitynet | didemo | msvd | lsmdc
    root: str = ""  # the corpus as it lies on disk (to pack it; training needs only data.shards)
    # Where the videos are: absolute, or relative to data.root; "" = the corpus' download layout
    # (MSRVTT/videos/all, YouTubeClips, Activity_Videos, DiDeMo_Videos, avi; then videos/, the root).
    video_dir: str = ""
    shards: str = ""  # packed WebDataset shards (their index for data=webdataset); "" = <data.root>/shards
    train_split: str = "train"
    test_split: str = "test"
    # A split carved from train that settings (eval.rerank_alpha) are chosen on, never on the test
    # split; "" = none (the configured values are used as they are).
    val_split: str = ""
    max_frames: int = 12
    max_words: int = 32
    sample_fps: float = 1.0
    batch_size: int = 32  # per rank
    eval_batch_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # Remote shards (data.shards=s3://...) are kept here once read whole, for later epochs and
    # runs; at most cache_gb, least recently read evicted first; "" = always stream.
    cache_dir: str = ""
    cache_gb: float = 50.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    webdataset: WebDatasetConfig = field(default_factory=WebDatasetConfig)


@dataclass
class ConConfig:
    """Stage ``con``: contrastive training of the encoders."""

    epochs: int = 5
    max_steps: int = 0  # optimizer steps (each deepspeed.grad_accum micro-batches); 0 = epochs decide
    lr: float = 1e-4
    clip_lr_coef: float = 1e-3  # CLIP parameters learn at lr * clip_lr_coef (pretrained weights only)
    weight_decay: float = 0.2
    warmup_ratio: float = 0.1
    log_every: int = 10
    # CLIP2TV momentum distillation (method.md section 5): an EMA teacher gives soft targets and
    # queues of its past features extend the candidate pool past the batch.
    momentum: bool = False
    momentum_m: float = 0.995
    queue_size: int = 0  # 0 = the pool is the global batch only
    distill_alpha: float = 0.4


GEN_MODES = ("gallery", "topk", "reference")  # stage.gen.mode: the pool builders of trainer/stages/pools.py


@dataclass
class GenConfig:
    """Stage ``gen``: the diffusion generator over candidate distributions, encoders frozen."""

    init: str = ""  # stage-con checkpoint (dir or model.pt); "" = this run's own con checkpoint
    epochs: int = 40
    max_steps: int = 0
    batch_size: int = 128  # queries per step (drawn from cached features)
    # gallery: each query's top-K of stage 1 (K = eval.rerank_topk) within a random train gallery of
    # `gallery` videos, what re-ranking sees; topk: the top-K of the whole train bank; reference:
    # DiffusionRet's hardest negatives of the random global batch (trainer/stages/pools.py).
    mode: str = "gallery"
    gallery: int = 0  # mode=gallery: videos per gallery; 0 = the test split's (the gallery re-ranking sees)
    pool_size: int = 128  # mode=reference: candidates per query, the positive + the hardest negatives
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    timesteps: int = 50
    schedule: str = "cosine"  # cosine | linear
    loss: str = "kl"  # kl | mse
    kl_scale: float = 100.0
    # Gaussian noise on the generator's input features while it trains (std relative to each
    # feature's RMS; 0 = none, the reference). The frozen encoder fits the train bank far better
    # than unseen videos: on clean train features the generator learns corrections that hold only
    # there (README "Stage gen": val R@1 fell 6 points after 100 steps on the counting corpus).
    feature_noise: float = 0.0
    # The frozen encoder's features of each split are encoded once across ranks into
    # <run_dir>/features/ and read memory-mapped (trainer/components/feature_store.py). true: a
    # re-run or resumed stage gen with the same encoder and data reuses them, no video decoded.
    cache_features: bool = True
    bank_dtype: str = "float16"  # float16 | bfloat16 | float32: the train bank's token features on disk
    # mode=topk mining: each query's candidates are first shortlisted by pooled features (one dot
    # product each), then ranked by exact WTI; 0 or >= the bank size = exact WTI over all of it.
    shortlist: int = 1024
    log_every: int = 10


@dataclass
class StageConfig:
    run: list[str] = field(default_factory=lambda: ["con", "gen"])
    con: ConConfig = field(default_factory=ConConfig)
    gen: GenConfig = field(default_factory=GenConfig)


@dataclass
class EvalConfig:
    rerank_topk: int = 32
    rerank_alpha: float = 1.0  # used as it is when there is no data.val_split; else chosen from the grid
    rerank_alpha_grid: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    ddim_steps: int = 0  # 0 = all gen.timesteps
    block: int = 256  # similarity block (rows) during evaluation
    dual_softmax_temperature: float = 100.0
    qb_bank: int = 1000  # training captions in the QB-Norm querybank (0 = skip QB-Norm)
    qb_k: int = 1
    qb_beta: float = 20.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: str = "bf16"  # bf16 | fp16 | fp32
    grad_accum: int = 1
    grad_clip: float = 1.0
    backend: str = "auto"  # auto = nccl with CUDA, gloo otherwise


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "streamret"
    run_name: str = ""
    registered_model: str = "streamret"
    champion_metric: str = "t2v_R1"  # alias `champion` moves only when a new version beats it on this
    register: bool = True  # register each finished run's model in the MLflow registry
    # A version whose champion metric is within noise of chance is registered but not promoted;
    # true promotes it all the same (a smoke test of the registry path, not a model to serve).
    promote_at_chance: bool = False
    system_metrics: bool = False
    flush_every_s: float = 5.0


@dataclass
class LauncherConfig:
    name: str = "local"  # local | deepspeed | ray
    # launcher=ray only (trainer/launchers/ray.py); the defaults fit a 2-CPU machine:
    address: str = ""  # Ray cluster; "" = RAY_ADDRESS / the job's cluster / a new local one
    num_workers: int = 1  # Ray Train workers = ranks
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Per worker, a pool of Ray Data actors (1 CPU each) decoding its clips anywhere in the
    # cluster: at least min, up to max while the cluster has CPUs the workers do not hold.
    decode_actors_min: int = 1
    decode_actors_max: int = 4
    placement: str = "PACK"  # of the workers over nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    max_failures: int = 3  # restarts of the worker group (a worker or node lost) before the job fails
    stall_timeout_s: float = 600.0  # a worker with no batch for this long fails, saying why (0 = wait)
    # Refuse to start when the cluster cannot hold workers + the decode pools' minimum (false for
    # an autoscaling cluster, whose nodes come after the request).
    check_fit: bool = True
    storage_path: str = ""  # Ray Train run storage; "" = <run.dir>/ray


@dataclass
class RunConfig:
    # "" = <corpus>-<model>-<YYYYmmdd-HHMMSS> (with resume=auto: the newest such run that has a
    # checkpoint); a run dir belongs to one run (trainer/components/rundir.py)
    name: str = ""
    dir: str = ""  # "" = runs/<run.name> under the working directory
    overwrite: bool = False  # a fresh run may replace the artifacts of another run in run.dir
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    resume: str = "none"  # none | auto (newest complete checkpoint of run.dir) | <checkpoint dir>
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end of each stage (and on SIGTERM/SIGINT)
    keep_last: int = 2  # complete checkpoints kept per stage, plus the best one (see eval_every)
    sample_log: bool = False  # the keys each step of stage con trained on: <run dir>/samples/ (audit)
    eval_every: int = 0  # optimizer steps between mid-stage evaluations of stage con (0 = only after
    # each stage); each one checkpoints, and `best` is then the best evaluated checkpoint (t2v Rsum)
    # A stage whose loss sits at chance (within collapse_margin nats of ln(pool)) or whose
    # similarities have no spread, collapse_patience log intervals in a row after the warmup, has
    # stopped learning: it is tagged in MLflow and, with stop_on_collapse, ends the run (exit 2).
    stop_on_collapse: bool = True
    collapse_min_step: int = 50  # and never before this optimizer step: a run this short is still near chance
    collapse_patience: int = 3
    collapse_margin: float = 0.05


@dataclass
class RootConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run: RunConfig = field(default_factory=RunConfig)
