"""A training run as it lies on disk: every config key with its default (defaults) and the checkpoints (checkpoint).

Training writes runs and inference reads them, so this sits below both: it imports `diffjax.model`, `diffjax.data`,
`diffjax.keys` and `diffjax.errors`, never `diffjax.train`, `diffjax.infer` or a command.
"""
