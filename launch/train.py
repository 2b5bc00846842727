"""Train streamret: `python launch/train.py [overrides]`, `deepspeed launch/train.py --stage gen ...`.

Overrides are Hydra's (`stage=gen data.batch_size=16 model=clip_b32`); `--stage X` and DeepSpeed's
injected `--local_rank=N` are accepted too. With no arguments it runs the embedded default job:
synthetic corpus -> shards -> stage con -> stage gen -> evaluation -> MLflow.
"""
import sys

from trainer.launchers.cli import load_config


def main() -> int:
    from trainer.launchers.errors import run_entry_point

    return run_entry_point(load_config, run)


def run(cfg) -> int:
    if cfg.launcher.name == "ray":  # the driver: Ray Data pipeline + a Ray Train TorchTrainer
        from trainer.launchers.ray import launch_ray

        return launch_ray(cfg)
    from trainer.run import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
