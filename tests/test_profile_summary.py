"""launch/profile_summary.py on a hand-made Chrome-format trace: device and host apart, busy time as the union of
overlapping events, operations ranked by their total time."""

import importlib.util
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    'profile_summary', pathlib.Path(__file__).parents[1] / 'launch' / 'profile_summary.py')
profile_summary = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile_summary)


def _trace():
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}}]
  device = [  # (name, start µs, duration µs): a 20 µs idle gap between 30 and 50, and a nested event
      ('fusion.1', 0, 10), ('gemm', 10, 20), ('gemm_inner', 12, 5), ('fusion.1', 50, 10), ('gemm', 60, 40)]
  host = [('python step', 0, 100)]
  events = [{'ph': 'X', 'pid': 1, 'tid': 7, 'name': n, 'ts': t, 'dur': d} for n, t, d in device]
  events += [{'ph': 'X', 'pid': 2, 'tid': 1, 'name': n, 'ts': t, 'dur': d} for n, t, d in host]
  return {'traceEvents': meta + events + [{'ph': 'i', 'pid': 1, 'name': 'marker', 'ts': 5}]}


def test_device_busy_time_and_top_operations():
  summary = profile_summary.summarize(_trace(), top=2)
  gpu = summary['devices']['/device:GPU:0']
  assert gpu['window_ms'] == pytest.approx(0.1)
  assert gpu['busy_ms'] == pytest.approx(0.08)  # 100 µs less the 20 µs gap; the nested event counts once
  assert [(op['name'], op['count']) for op in gpu['ops']] == [('gemm', 2), ('fusion.1', 2)]
  assert gpu['ops'][0]['total_ms'] == pytest.approx(0.06)
  assert gpu['ops'][0]['share'] == pytest.approx(0.75)
  assert summary['host']['busy_ms'] == pytest.approx(0.1)


def test_time_per_step_by_kind_of_operation():
  trace = _trace()
  names = ('cudnn_generated_fort_native_sdpa_sm90_flash_bprop', 'nvjet_sm90_tst_128x160', 'memcpy128',
           'loop_add_fusion')
  trace['traceEvents'] += [{'ph': 'X', 'pid': 1, 'tid': 8, 'name': n, 'ts': 200 + 10 * i, 'dur': 4 * (i + 1)}
                           for i, n in enumerate(names)]
  by_kind = profile_summary.summarize(trace, top=3, steps=2)['devices']['/device:GPU:0']['step_ms_by_kind']
  # The hand-made trace's own gemm events (65 µs) are matmuls and its fusion.1 (20 µs) is in the rest.
  assert by_kind == pytest.approx({'attention': 0.002, 'matmul': (65 + 8) / 2e3, 'copy': 0.006,
                                   'other': (20 + 16) / 2e3})


def test_a_folder_without_a_trace_is_one_line(tmp_path):
  with pytest.raises(SystemExit, match=r'^error: no \*\.trace\.json\.gz below'):
    profile_summary.newest_trace(str(tmp_path))


_OPS = {  # instruction: the op_name XLA keeps of it, as in a dump of the step
    'custom-call.146': 'jit(train_step)/jvp(Transformer)/block_0/attn/q_proj/dot_general',
    'loop_convert_fusion.1': 'jit(train_step)/transpose(jvp(Transformer))/jvp(Transformer)/checkpoint/block_23/attn/'
                             'attn.softmax_heads/convert_element_type',
    'input_reduce_fusion.53': 'jit(train_step)/transpose(jvp(Transformer))/jvp(Transformer)/checkpoint/block_3/attn/'
                              'checkpoint/rematted_computation/subln/reduce_sum'}
_HLO = 'ENTRY %main {\n' + ''.join(
    f'  {"ROOT " * (name == "input_reduce_fusion.53")}%{name} = f32[8]{{0}} fusion(%p0), kind=kLoop, '
    f'metadata={{op_name="{op_name}" scheduling_name="{name}"}}\n' for name, op_name in _OPS.items()) + '}\n'


def test_time_by_part_of_the_model_from_the_hlo():
  sources = profile_summary.hlo_sources(_HLO)
  assert profile_summary.part_of(sources['custom-call.146']) == 'attn/q_proj, forward'
  assert profile_summary.part_of(sources['loop_convert_fusion.1']) == 'attn, backward'
  assert profile_summary.part_of(sources['input_reduce_fusion.53']) == 'attn/subln, recomputed'
  assert profile_summary.part_of('jit(train_step)/mul') == 'outside the blocks, forward'
  trace = _trace()
  # A cuBLAS kernel names its instruction in the event's hlo_op; an XLA fusion's kernel is named after it.
  trace['traceEvents'] += [
      {'ph': 'X', 'pid': 1, 'tid': 8, 'name': 'nvjet_sm90_tst', 'ts': 200, 'dur': 30,
       'args': {'hlo_op': 'custom-call.146'}},
      {'ph': 'X', 'pid': 1, 'tid': 8, 'name': 'loop_convert_fusion_1', 'ts': 240, 'dur': 12},
      {'ph': 'X', 'pid': 1, 'tid': 8, 'name': 'input_reduce_fusion_53', 'ts': 260, 'dur': 6}]
  by_part = profile_summary.summarize(trace, top=3, steps=2, sources=sources)['devices']['/device:GPU:0']
  # The hand-made trace's own events (fusion.1, gemm and the nested gemm_inner: 85 µs) are not in this HLO.
  assert by_part['step_ms_by_part'] == pytest.approx({'not in the HLO': 0.0425, 'attn/q_proj, forward': 0.015,
                                                      'attn, backward': 0.006, 'attn/subln, recomputed': 0.003})
  assert list(by_part['step_ms_by_part'])[0] == 'not in the HLO'  # the largest first


def test_a_dump_folder_without_the_optimized_hlo_is_one_line(tmp_path):
  (tmp_path / 'module_1.jit_train_step.before_optimizations.txt').write_text(_HLO)
  with pytest.raises(SystemExit, match=r'^error: no \*after_optimizations\.txt in .*xla_dump_to'):
    profile_summary.read_hlo(str(tmp_path))
  (tmp_path / 'module_1.jit_train_step.sm_9.0a_gpu_after_optimizations.txt').write_text(_HLO)
  assert profile_summary.hlo_sources(profile_summary.read_hlo(str(tmp_path))) == _OPS
