"""The network: its config (config), generic layers (layers), attention and the kernel dispatcher (attention), the
fused Pallas kernel (kernels), the decoder (transformer), a model's loss on a batch (losses) and the logical-axis
sharding rules its parameters are annotated with (sharding).

Imports nothing of the package but `diffjax.keys` and `diffjax.errors`: the model knows no data, run, training or
inference.
"""
