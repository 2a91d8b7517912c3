"""The embedding's gradient is scatter-added in float32, and the output projection still runs in bfloat16.

A 16-bit scatter-add into the embedding table made real training runs on GPUs three times slower than the step on
random tokens: real text sends most updates to a few rows, and colliding 16-bit atomic adds serialise. These tests
read the train step's program as XLA receives it. The CPU compiler widens 16-bit scatters to float32 in its own
optimisation passes, so only the program before those passes shows what a GPU would be asked to do.
"""

import re

import pytest

from diffjax.model import sharding
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step
from helpers_training import REPO, load_config_file

SIXTEEN_BIT = ('bf16', 'f16')
# `name = dtype[dims]{layout} op(operand, ...)`, one instruction of HLO text.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?(\S+) = (\w+)\[([\d,]*)\]\S* (\S+)\(([^)]*)\)')


def step_program(variant: str, tie_embeddings: bool, loss_chunk_tokens: int) -> tuple[str, int, int]:
  """(HLO text of the seed config's train step before optimisation, vocabulary size, width), at a short batch."""
  config = load_config_file(REPO / 'configs' / 'seed.py')
  config.data.tokenizer = 'byte'
  config.model.update(variant=variant, tie_embeddings=tie_embeddings)
  config.train.update(global_batch_size=2, microbatches=1, seq_len=64, loss_chunk_tokens=loss_chunk_tokens)
  cfg = defaults.model_config(config, vocab_size=258)
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.train), optim.learning_rate_schedule(config.train)
  train, _ = train_step.compile_steps(cfg, tx, schedule, config.train, mesh)
  lowered = train.lower(train_step.abstract_state(cfg, tx, mesh),
                        train_step.batch_spec(2, 64, train_step.batch_sharding(mesh)))
  return lowered.as_text(dialect='hlo'), cfg.vocab_size, cfg.d_model


def instructions(hlo: str) -> dict[str, tuple[str, tuple[int, ...], str, list[str]]]:
  """name -> (dtype, shape, opcode, operand names) for every array-valued instruction."""
  found = {}
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      name, dtype, dims, opcode, operands = match.groups()
      shape = tuple(int(d) for d in dims.split(',') if d)
      found[name] = (dtype, shape, opcode, [o.strip() for o in operands.split(',') if o.strip()])
  return found


CASES = [('diff_v1', False, 0), ('diff_v1', True, 0), ('diff_v1', True, 32), ('diff_v1', False, 32),
         ('baseline', False, 0), ('diff_v2', True, 0)]


@pytest.mark.parametrize('variant,tied,chunk', CASES)
def test_no_16_bit_scatter_and_a_16_bit_output_projection(variant, tied, chunk):
  hlo, vocab, width = step_program(variant, tied, chunk)
  program = instructions(hlo)
  scatters = {name: dtype for name, (dtype, _, opcode, _) in program.items() if opcode == 'scatter'}
  assert any(shape == (vocab, width) for dtype, shape, opcode, _ in program.values() if opcode == 'scatter'), \
      'the embedding gradient is no longer a scatter: this test no longer guards it'
  assert not {n: d for n, d in scatters.items() if d in SIXTEEN_BIT}, f'16-bit scatters: {scatters}'

  # The output projection and its two gradients: the matmuls that touch a (vocab, width) or (width, vocab) shape
  # or give one, with the table or lm_head kernel in bfloat16 as every other weight matmul of the step.
  head = {(vocab, width), (width, vocab)}
  projections = []
  for name, (dtype, shape, opcode, operands) in program.items():
    if opcode != 'dot':
      continue
    shapes = [program[o][1] for o in operands if o in program] + [shape]
    if any(s[-2:] in head or s[-1] == vocab for s in shapes):
      projections.append((name, [program[o][0] for o in operands if o in program]))
  assert len(projections) >= 3, projections  # forward, and the gradients of both operands
  for name, operand_dtypes in projections:
    assert operand_dtypes and all(d in SIXTEEN_BIT for d in operand_dtypes), (name, operand_dtypes)
