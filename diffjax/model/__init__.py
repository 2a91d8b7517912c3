"""The network: its config, attention (with the fused Pallas kernel), the decoder, the losses and the logical-axis
sharding rules its parameters are annotated with.

Imports nothing of the package but `diffjax.errors`: the model knows no data, run, training or inference.
"""
