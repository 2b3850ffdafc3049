"""The parallel benchmark: its reading of compiled HLO, and its command line end to end.

No timing is asserted: speed is what the benchmark reports, not what tests pin.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import hlo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A loop (a scan's while) whose body calls a conditional with an all-reduce in one
# branch and permutes a tuple itself; outside, an all-gather, an asynchronous
# all-reduce pair and two collectives over single-device groups (which move nothing).
_HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%branch_0 (p: f32[16]) -> f32[16] {
  %p = f32[16]{0} parameter(0)
  ROOT %psum.1 = f32[16]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1},{2,3}}, use_global_device_ids=true, to_apply=%add
}

%branch_1 (q: f32[16]) -> f32[16] {
  ROOT %q = f32[16]{0} parameter(0)
}

%body (carry: (s32[], f32[16], f32[8,128])) -> (s32[], f32[16], f32[8,128]) {
  %carry = (s32[], f32[16]{0}, f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%carry), index=0
  %x = f32[16]{0} get-tuple-element(%carry), index=1
  %y = f32[8,128]{1,0} get-tuple-element(%carry), index=2
  %c = f32[16]{0} conditional(%i, %x, %x), branch_computations={%branch_0, %branch_1}
  %ppermute.2 = (f32[8,128]{1,0}, s32[8]{0}, /*index=2*/pred[]) collective-permute(%y, %i, %i), channel_id=2, source_target_pairs={{0,1},{1,2}}
  %self = f32[8,128]{1,0} collective-permute(%y), channel_id=3, source_target_pairs={{0,0}}
  %y2 = f32[8,128]{1,0} get-tuple-element(%ppermute.2), index=0
  ROOT %out = (s32[], f32[16]{0}, f32[8,128]{1,0}) tuple(%i, %c, %y2)
}

%cond (carry.1: (s32[], f32[16], f32[8,128])) -> pred[] {
  %carry.1 = (s32[], f32[16]{0}, f32[8,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%carry.1), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (arg: f32[4]) -> f32[4] {
  %arg = f32[4]{0} parameter(0)
  %init = (s32[], f32[16]{0}, f32[8,128]{1,0}) custom-call(), custom_call_target="init"
  %while.1 = (s32[], f32[16]{0}, f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
  %gathered = f32[2,4]{1,0} all-gather(%arg), channel_id=4, replica_groups=[1,2]<=[2], dimensions={0}
  %start = f32[4]{0} all-reduce-start(%arg), channel_id=5, replica_groups={}, to_apply=%add
  %done = f32[4]{0} all-reduce-done(%start)
  %alone = f32[2,4]{1,0} all-reduce(%gathered), channel_id=6, replica_groups={{0},{1}}, to_apply=%add
  %alone.iota = f32[4]{0} all-reduce(%done), channel_id=7, replica_groups=[2,1]<=[2], to_apply=%add
  ROOT %r = f32[4]{0} add(%done, %alone.iota)
}
"""


def test_collective_bytes_separates_loop_bodies_from_the_rest():
  counted = hlo.collective_bytes(_HLO)
  # In the loop: the all-reduce of f32[16] in a branch (64 bytes) and the tuple permute
  # (4096 + 32 + 1); the permute to itself moves nothing.
  # Outside: the all-gather f32[2,4] (32) and the async all-reduce, counted once (16).
  assert counted == {'in_loop_bytes': 64 + 4096 + 32 + 1, 'outside_loop_bytes': 32 + 16,
                     'in_loop_ops': 2, 'outside_loop_ops': 2}, counted


def test_convolution_kinds_names_whose_convolutions_run():
  onednn = '  %c = f32[8,4]{1,0} custom-call(%x), custom_call_target="bwbpf_onednn_conv_forward"'
  xla = '  %c = f32[1,4,4,8]{3,2,1,0} convolution(%x, %w), window={size=3x3}'
  assert hlo.convolution_kinds(onednn) == 'onednn'
  assert hlo.convolution_kinds(xla) == 'xla'
  assert hlo.convolution_kinds(onednn + '\n' + xla) == 'mixed'
  assert hlo.convolution_kinds(_HLO) == 'none'


_TINY = ('--processes=2', '--arch=vgg11', '--width=0.125', '--image_size=16',
         '--batch_size=16', '--microbatches=2', '--num_blocks=2', '--steps=1',
         '--unit_repeats=1')
_COMMON_FIELDS = ('config', 'arch', 'width', 'batch_size', 'microbatches', 'num_blocks',
                  'pipeline_stages', 'processes', 'split_points', 'images_per_sec',
                  'xla_memory_per_device', 'collective_bytes', 'convolutions', 'per_process',
                  'load_avg_1m', 'jax')
_PROCESS_FIELDS = ('cores', 'cpu_per_wall', 'peak_rss_bytes')


def _bench(*flags, timeout=1500, env=None):
  return subprocess.run([sys.executable, '-m', 'benchmarks.parallel_bench', *_TINY, *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def _lines(proc) -> dict:
  return {line['config']: line for line in map(json.loads, (
      l for l in proc.stdout.splitlines() if l.startswith('{')))}


@pytest.mark.parametrize('flags, message', [
    (('--bogus',), "error: Unknown command line flag 'bogus'"),
    (('--configs=nope',), "error: unknown --configs ['nope']; choose from "),
    (('--processes=3', '--configs=blocks'), 'error: --processes=3 is not a multiple of the 2 '
                                            'pipeline stages'),
    (('extra',), 'error: unexpected arguments: extra')])
def test_a_bad_flag_is_one_line_and_exit_2(flags, message):
  proc = _bench(*flags, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(message), proc.stderr
  assert proc.stdout == ''


@pytest.mark.slow
def test_every_configuration_reports_its_fields():
  # The cut given: choosing it times every cut (the next test), ~50 s of compiling here.
  proc = _bench('--split_points=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _lines(proc)
  assert sorted(lines) == sorted(['sync', 'sync_full_batch', 'blocks', 'data_bwbpf',
                                  'data_bp', 'all_cores_bwbpf', 'all_cores_bp',
                                  'host_dispatch']), proc.stdout
  for config, line in lines.items():
    missing = [f for f in _COMMON_FIELDS if f not in line]
    assert not missing, (config, missing)
    assert line['images_per_sec'] > 0, line
    assert line['xla_memory_per_device']['temp_bytes'] > 0, line
    one_process = ('sync', 'sync_full_batch', 'all_cores_bwbpf', 'all_cores_bp', 'host_dispatch')
    processes = 1 if config in one_process else 2
    assert len(line['per_process']) == processes == line['processes'], line
    assert line['cores'] == (1 if config.startswith('sync') else 2), line
    for process in line['per_process']:
      assert all(f in process for f in _PROCESS_FIELDS), (config, process)
      assert process['cpu_per_wall'] > 0, (config, process)
    if config not in ('sync', 'sync_full_batch'):
      assert line['speedup'] > 0 and line['parallel_efficiency'] > 0, line
  # Each multi-process worker ran pinned to a core of its own.
  assert [p['cores'] for p in lines['blocks']['per_process']] in ([[0], [1]], [[1], [0]]) \
      or len(os.sched_getaffinity(0)) < 2
  # A plain run: one process on both cores, the fused step of the named mode.
  for config in ('all_cores_bwbpf', 'all_cores_bp'):
    assert lines[config]['per_process'][0]['cores'] == [0, 1] \
        or len(os.sched_getaffinity(0)) < 2
  assert lines['all_cores_bp']['collective_bytes']['total_per_step'] == 0
  blocks = lines['blocks']
  assert blocks['mesh'] == {'data': 1, 'stage': 2}
  # Each of the M=2 ticks, stage 0 sends its micro-batch's activations (8 examples) on.
  # (Counted per step: XLA unrolls the one-iteration loops of this tiny schedule.)
  assert (blocks['collective_bytes']['total_per_step']
          >= 2 * 8 * blocks['activation_bytes_per_example'])
  assert 0 < blocks['bubble_fraction'] < 1
  assert blocks['compile_seconds'] > 0
  # Data parallelism all-reduces gradients once per step, outside any loop.
  assert lines['data_bp']['collective_bytes']['per_step'] > 0
  assert lines['data_bp']['collective_bytes']['per_tick'] == 0
  assert lines['sync']['collective_bytes']['total_per_step'] == 0


@pytest.mark.slow
def test_the_cut_is_the_timed_two_block_cut_whose_slower_block_is_fastest():
  # Without --split_points: each unit timed alone, then every two-block cut as it would run;
  # tests/user_networks.py's CNN has 4 units, so 3 cuts.
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  proc = _bench('--configs=sync', '--arch=user_networks:small_cnn',
                env={'PYTHONPATH': os.pathsep.join([REPO, tests_dir])})
  assert proc.returncode == 0, proc.stderr[-3000:]
  sync = _lines(proc)['sync']
  assert len(sync['unit_seconds']) == 4 and min(sync['unit_seconds']) > 0, sync
  cuts = sync['cut_seconds']
  assert sorted(cuts) == ['1', '2', '3'], cuts
  (point,) = sync['split_points']
  # The reported times are rounded to 10 us; the choice was made on the unrounded ones.
  assert max(cuts[str(point)]) <= min(max(times) for times in cuts.values()) + 1e-5, sync
  assert sync['block_seconds'] == cuts[str(point)]
  assert sync['projected_speedup'] > 0


def test_a_failing_worker_names_its_configuration_and_stops_the_others():
  # Process 1 fails at once. Process 0, left alone, would wait for it in
  # jax.distributed.initialize for 120 s and the run would pass `timeout`: it must be killed.
  proc = _bench('--configs=blocks', '--split_points=4', '--fail_process=1', timeout=90)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert errors == ['error: configuration blocks failed: worker 1 exited with 1: '
                    'error: process 1 failed on purpose (--fail_process)'], proc.stderr
  assert not [l for l in proc.stdout.splitlines() if l.startswith('{')]
