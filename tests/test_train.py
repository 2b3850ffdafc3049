"""experiments.train's header: where the step runs (the loop itself: test_resume.py)."""

import types

from experiments import train


def _device(index, process_index=0, platform='cpu'):
  return types.SimpleNamespace(id=index, process_index=process_index, platform=platform)


def test_the_header_names_the_mesh_and_its_devices():
  placement = train._placement  # pylint: disable=protected-access
  blocks = types.SimpleNamespace(name='blocks', num_devices=4,
                                 mesh_shape={'data': 2, 'stage': 2})
  devices = [_device(0), _device(1), _device(2, 1), _device(3, 1)]
  assert placement(blocks, devices) == (
      '--parallel=blocks: mesh 2 data x 2 stage over 4 cpu devices (ids 0-3, 2 processes)')
  data = types.SimpleNamespace(name='data', num_devices=3, mesh_shape={'data': 3})
  assert placement(data, [_device(0), _device(2), _device(3)]) == (
      '--parallel=data: mesh 3 data over 3 cpu devices (ids 0, 2-3)')
