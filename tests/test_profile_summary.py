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
