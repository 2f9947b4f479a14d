"""Stages 4-6: divergence telemetry and policies, losses, the trainer, evaluation, checkpoints."""
