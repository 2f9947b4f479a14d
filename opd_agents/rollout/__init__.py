"""Stage 2: the message/token boundary (renderer), batched sampling, episode rollouts."""
