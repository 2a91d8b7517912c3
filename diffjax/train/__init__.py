"""Training: the sharded state and the compiled steps (step), the loop (loop), the optimizer (optim), metrics, the
workdir's one-writer lock (workdir), the memory estimate (preflight) and the whole-config check (validate).

Imports `diffjax.run`, `diffjax.model`, `diffjax.data` and `diffjax.errors`, never `diffjax.infer` or a command.
`__main__.py` is the train command, `python -m diffjax.train`, which nothing imports.
"""
