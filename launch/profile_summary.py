"""The top operations of a jax.profiler trace (a run's WORKDIR/profile, from `log.profile_start_step`).

  python launch/profile_summary.py WORKDIR/profile --top 25 --steps 2 --out profile_summary.json [--hlo DUMP_DIR]

Reads the newest `*.trace.json.gz` below the folder and adds up the duration of every complete event by name, on the
accelerators (`/device:...` processes: kernels and XLA fusions) and, separately, on the host. It prints, per
device, how busy it was over the traced window (the gap is time the device waited: for the host, the input or a
sync), its time per step by kind of operation (attention kernels, matrix multiplications, copies, the rest; over
--steps, the run's `log.profile_steps`) and the operations that took the most time, then writes the same as JSON.

With --hlo, the step's optimized HLO as XLA dumps it, it also adds the device time up by where each operation comes
from in the model: the module path inside a block (`attn/q_proj`, `attn/subln`, `ffn`, ...) and the pass (forward,
backward, or recomputed under remat), read from each instruction's op_name. Dump it with
`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train_step.*"` beside the profiled run.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys


def newest_trace(folder: str) -> str:
  paths = glob.glob(os.path.join(folder, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise SystemExit(f'error: no *.trace.json.gz below {folder}; run a training with '
                     '--config.log.profile_start_step=N first')
  return max(paths, key=os.path.getmtime)


# Kinds of operation, told by name, the first that matches: cuDNN's attention (with its helper kernels) and the
# Pallas ones, matrix multiplications (cuBLAS, XLA's GEMM fusions), and copies between buffers.
KINDS = (('attention', ('sdpa', 'flash', 'attention', 'cudnn::fusion')),
         ('matmul', ('nvjet', 'gemm', 'cublas', 'cutlass', 'xmma', 'convolution')),
         ('copy', ('memcpy', 'copy')))


def kind_of(name: str) -> str:
  lowered = name.lower()
  return next((kind for kind, marks in KINDS if any(mark in lowered for mark in marks)), 'other')


# An instruction of the optimized HLO and the op_name of the JAX operation it came from.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?metadata=\{[^\n]*?op_name="([^"]*)"', re.M)
# Path components that say how JAX got there, not where in the model: transformation wrappers such as
# `transpose(jvp(Transformer))`, remat's, and the block number (all blocks are one part).
_NOT_A_MODULE = re.compile(r'.*\(.*|checkpoint|rematted_computation|block_\d+|.*\..*')


def hlo_sources(hlo_text: str) -> dict:
  """{instruction name: op_name} of an XLA dump (`*after_optimizations.txt`)."""
  return dict(_INSTRUCTION.findall(hlo_text))


def part_of(op_name: str) -> str:
  """Where an op_name sits in the model and in which pass, e.g. 'attn/q_proj, backward'."""
  path = '/'.join(c for c in op_name.split('/')[:-1] if not _NOT_A_MODULE.fullmatch(c))
  phase = ('recomputed' if 'rematted_computation' in op_name else 'backward' if 'transpose(' in op_name
           else 'forward')
  return f'{path or "outside the blocks"}, {phase}'


def _instruction(event: dict) -> str:
  """The HLO instruction behind a device event: the trace's `hlo_op`, else the kernel's own name, which XLA takes
  from its fusion with the last '.' as '_'."""
  return event.get('args', {}).get('hlo_op') or re.sub(r'_(\d+)$', r'.\1', event['name'])


def summarize(trace: dict, top: int, steps: int = 1, sources: dict | None = None) -> dict:
  """{'devices': {process: {'busy_ms', 'window_ms', 'step_ms_by_kind', 'ops': [...]}}, 'host': {...}} of a
  Chrome-format trace of `steps` steps; an operation's time is the sum of its own events, nested ones included.
  With `sources` (`hlo_sources`), each device also gets 'step_ms_by_part' (`part_of`), the largest first."""
  events = trace['traceEvents']
  processes = {e['pid']: e['args']['name'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  groups = collections.defaultdict(list)
  for event in events:
    if event.get('ph') == 'X' and 'dur' in event:
      name = processes.get(event['pid'], str(event['pid']))
      groups[name if name.startswith('/device:') else 'host'].append(event)
  summary = {'devices': {}, 'host': None}
  for process, items in sorted(groups.items()):
    totals, counts = collections.Counter(), collections.Counter()
    for event in items:
      totals[event['name']] += event['dur']
      counts[event['name']] += 1
    begin, end = min(e['ts'] for e in items), max(e['ts'] + e['dur'] for e in items)
    busy = _union_length(sorted((e['ts'], e['ts'] + e['dur']) for e in items))
    by_kind = collections.Counter()
    for name, total in totals.items():
      by_kind[kind_of(name)] += total / 1e3 / steps
    part = {'window_ms': (end - begin) / 1e3, 'busy_ms': busy / 1e3, 'steps': steps,
            'step_ms_by_kind': {kind: by_kind[kind] for kind in [k for k, _ in KINDS] + ['other']},
            'ops': [{'name': name, 'total_ms': total / 1e3, 'count': counts[name], 'share': total / max(busy, 1e-9)}
                    for name, total in totals.most_common(top)]}
    if sources is not None and process != 'host':
      by_part = collections.Counter()
      for event in items:
        op_name = sources.get(_instruction(event))
        by_part[part_of(op_name) if op_name else 'not in the HLO'] += event['dur'] / 1e3 / steps
      part['step_ms_by_part'] = dict(by_part.most_common())
    if process == 'host':
      summary['host'] = part
    else:
      summary['devices'][process] = part
  return summary


def _union_length(intervals) -> float:
  """Total length covered by sorted (start, end) intervals: nested and overlapping events count once."""
  covered, current_start, current_end = 0.0, None, None
  for start, end in intervals:
    if current_end is None or start > current_end:
      if current_end is not None:
        covered += current_end - current_start
      current_start, current_end = start, end
    else:
      current_end = max(current_end, end)
  return covered + (current_end - current_start if current_end is not None else 0.0)


def print_summary(summary: dict):
  parts = list(summary['devices'].items()) or [('host (no device events in this trace)', summary['host'])]
  for process, part in parts:
    if part is None:
      continue
    print(f'{process}: busy {part["busy_ms"]:.1f} of {part["window_ms"]:.1f} ms '
          f'({100 * part["busy_ms"] / max(part["window_ms"], 1e-9):.1f}%)')
    print(f'ms per step over {part["steps"]}: ' + ', '.join(f'{kind} {ms:.1f}'
                                                            for kind, ms in part['step_ms_by_kind'].items()))
    if 'step_ms_by_part' in part:
      print('ms per step by part of the model, the largest:')
      for name, ms in list(part['step_ms_by_part'].items())[:16]:
        print(f'{ms:>10.2f}  {name}')
    print(f'{"total ms":>10} {"count":>7} {"share":>7}  operation')
    for op in part['ops']:
      print(f'{op["total_ms"]:>10.2f} {op["count"]:>7} {100 * op["share"]:>6.1f}%  {op["name"][:100]}')


def read_hlo(path: str) -> str:
  """The text of an XLA dump: the file, or a dump folder's largest `*after_optimizations.txt` (the train step's)."""
  if os.path.isdir(path):
    dumps = glob.glob(os.path.join(path, '*after_optimizations.txt'))
    if not dumps:
      raise SystemExit(f'error: no *after_optimizations.txt in {path}; dump the step with XLA_FLAGS='
                       '"--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train_step.*"')
    path = max(dumps, key=os.path.getsize)
  if not os.path.isfile(path):
    raise SystemExit(f'error: --hlo {path}: no such file')
  with open(path) as f:
    return f.read()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('folder', help='a run\'s profile folder (WORKDIR/profile) or any folder above a trace')
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--steps', type=int, default=1, help='steps the trace holds (the run\'s log.profile_steps)')
  parser.add_argument('--out', default='', help='write the summary as JSON here')
  parser.add_argument('--hlo', default='', help='the step\'s optimized HLO (an XLA dump\'s '
                      '*after_optimizations.txt, or the dump folder, whose largest such file is read)')
  args = parser.parse_args()
  path = newest_trace(args.folder)
  with gzip.open(path, 'rt') as f:
    summary = summarize(json.load(f), args.top, args.steps, hlo_sources(read_hlo(args.hlo)) if args.hlo else None)
  summary['trace'] = path
  if args.out:  # written first, so that a reader of the table that stops early (`| head`) cannot lose it
    with open(args.out, 'w') as f:
      json.dump(summary, f, indent=1)
  try:
    print_summary(summary)
  except BrokenPipeError:  # the reader stopped early (`| head`): the table's end is not wanted
    sys.stdout = open(os.devnull, 'w')


if __name__ == '__main__':
  main()
