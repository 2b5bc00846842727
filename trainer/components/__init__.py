"""Trainer components a run and its stage loops call: distributed setup, the DeepSpeed engine,
data sources, checkpoints (with their cadence), preemption, stage exports, the stage-loop
skeleton, feature banks and MLflow tracking. May import the model library, config, shards, ops."""
