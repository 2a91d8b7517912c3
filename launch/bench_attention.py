"""Times the attention kernels of every variant and implementation, and checks each fast path against `xla`.

  python launch/bench_attention.py [--batch 8 --seq 2048 --width 2048 --heads 16 --out bench_attention.json]

Prints a table (forward and forward+backward milliseconds, model TFLOP/s, compiled temporary memory, the
relative error of the output and of the gradients against the first implementation, `xla` by default) and writes
the same rows as JSON. Model FLOPs follow the docs: causal attention counted at half, DIFF counted as the baseline,
forward+backward = 3x forward. On a GPU, DIFF V1 runs cuDNN both ways: `cudnn_split` (each map against the two
D-wide halves of V) and `cudnn_wide` (one call per map against the 2D-wide values, where cuDNN takes them);
`attention.cudnn_diff_v1_form` picks between them from these timings. Where tokamax is installed, `tokamax` runs its
kernels with their default tiles and `tokamax_tuned` with the tiles its autotuner measures best for these shapes on
this GPU (it compiles and times every candidate first, which takes minutes). At long sequences `--impls
cudnn,cudnn_split,cudnn_wide,pallas` leaves out the XLA path, whose T x T maps would not fit.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import errors
from diffjax.model import attention


def inputs(variant, args, key):
  d = args.width // args.heads
  b, t, n, kv = args.batch, args.seq, args.heads, args.kv_heads
  shapes = {  # (q, k, v) of each variant at the same width and head width
      'baseline': ((b, t, n, d), (b, t, kv, d), (b, t, kv, d)),
      'diff_v1': ((b, t, n, d), (b, t, kv, d), (b, t, kv // 2, 2 * d)),
      'diff_v2': ((b, t, 2 * n, d), (b, t, kv, d), (b, t, kv, d)),
  }[variant]
  keys = jax.random.split(key, 3)
  return [jax.random.normal(k, s, jnp.float32).astype(args.dtype) for k, s in zip(keys, shapes)]


def kernel(variant, impl):
  if variant == 'diff_v1':
    return lambda q, k, v: attention.diff_v1_attention(q, k, v, jnp.float32(0.6), impl)
  return lambda q, k, v: attention.softmax_attention(q, k, v, impl)


def tokamax_tuned(fn, args_):
  """fn compiled with the kernel configs that tokamax's autotuner finds fastest for these arguments; tokamax reads
  its configs when it traces, so the call is traced inside the tuned result."""
  import tokamax
  tuned = tokamax.autotune(jax.jit(fn), *args_, progress_bar=False)

  def call(*a):
    with tuned:
      return fn(*a)
  return jax.jit(call)


def median_ms(fn, args_, iters):
  jax.block_until_ready(fn(*args_))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args_))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--width', type=int, default=2048)
  parser.add_argument('--heads', type=int, default=16, help='baseline head count')
  parser.add_argument('--kv-heads', type=int, default=16)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--iters', type=int, default=20)
  on_gpu = jax.default_backend() == 'gpu'
  gpu_impls = 'xla,cudnn,cudnn_split,cudnn_wide,pallas' + (',tokamax' if attention.tokamax_installed() else '')
  # tokamax_tuned is left out by default: its autotuning takes minutes a shape.
  parser.add_argument('--impls', default=gpu_impls if on_gpu else 'xla',
                      help='implementations to time; the first one a variant runs is its reference for the errors')
  parser.add_argument('--variants', default='baseline,diff_v1,diff_v2', help='variants to time')
  parser.add_argument('--out', default='bench_attention.json')
  args = parser.parse_args()
  impls = args.impls.split(',')
  forward_flops = 2.0 * args.batch * args.seq * args.seq * args.width  # 4·B·T²·E halved for causality
  rows = []
  for variant in args.variants.split(','):
    q, k, v = inputs(variant, args, jax.random.key(0))
    reference = None
    for impl in impls:
      if impl in ('pallas', 'cudnn_split', 'cudnn_wide') and variant != 'diff_v1':
        continue  # the fused Pallas kernel and the two cuDNN forms exist for DIFF V1 only
      if impl == 'cudnn_wide' and not attention.cudnn_takes_wide_values():
        continue
      if impl == 'cudnn' and variant == 'diff_v1':
        continue  # it runs one of the two forms timed on their own
      if impl == 'tokamax_tuned':
        print(f'{variant}: tokamax autotunes its kernels for this shape (minutes)', flush=True)
      f = kernel(variant, impl.removesuffix('_tuned'))
      grad_f = jax.grad(lambda q, k, v: jnp.sum(jnp.square(f(q, k, v))), argnums=(0, 1, 2))
      try:
        compile_ = (lambda fn: tokamax_tuned(fn, (q, k, v))) if impl == 'tokamax_tuned' else jax.jit
        forward, backward = compile_(f), compile_(grad_f)
        out = np.asarray(forward(q, k, v), np.float32)
        grads = np.concatenate([np.asarray(g, np.float32).ravel() for g in backward(q, k, v)])
      except Exception as error:  # one kernel that cannot run this shape leaves the others' rows to time
        print(f'{variant} {impl}: {errors.first_line(error)}', flush=True)
        continue
      reference = (out, grads) if reference is None else reference
      memory = backward.lower(q, k, v).compile().memory_analysis()
      row = {'variant': variant, 'impl': impl, 'device': jax.devices()[0].device_kind,
             'shape': f'b{args.batch} t{args.seq} E{args.width} h{args.heads}/{args.kv_heads} {args.dtype}',
             'fwd_ms': median_ms(forward, (q, k, v), args.iters),
             'fwd_bwd_ms': median_ms(backward, (q, k, v), args.iters),
             'fwd_bwd_temp_mib': getattr(memory, 'temp_size_in_bytes', 0) / 2**20,
             'rel_err': float(np.linalg.norm(out - reference[0]) / np.linalg.norm(reference[0])),
             'grad_rel_err': float(np.linalg.norm(grads - reference[1]) / np.linalg.norm(reference[1]))}
      row['fwd_tflops'] = forward_flops / row['fwd_ms'] / 1e9
      row['fwd_bwd_tflops'] = 3 * forward_flops / row['fwd_bwd_ms'] / 1e9
      rows.append(row)
  header = f'{"variant":<9} {"impl":<13} {"fwd ms":>8} {"fwd+bwd ms":>11} {"fwd TF/s":>9} {"f+b TF/s":>9} ' \
           f'{"temp MiB":>9} {"rel err":>9} {"grad err":>9}'
  print(f'{rows[0]["device"]}, {rows[0]["shape"]}; errors against each variant\'s first row')
  print(header)
  for r in rows:
    print(f'{r["variant"]:<9} {r["impl"]:<13} {r["fwd_ms"]:>8.3f} {r["fwd_bwd_ms"]:>11.3f} {r["fwd_tflops"]:>9.1f} '
          f'{r["fwd_bwd_tflops"]:>9.1f} {r["fwd_bwd_temp_mib"]:>9.0f} {r["rel_err"]:>9.2e} {r["grad_rel_err"]:>9.2e}')
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
