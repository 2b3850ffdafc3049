"""The test classes that need 8 devices, run in pytest processes started with 8 emulated CPU devices.

The suite itself starts JAX with one CPU device (tests/conftest.py). Two launches,
not one per file: each pays for Python, JAX and the test modules' imports, and
two let pytest -n run them side by side. Grouped by what the modules import
(test_vit imports test_network). Run directly on 8 devices, the classes run in
this session and this launcher skips.
"""

import jax
import pytest

import fake_devices

GROUPS = {
    'user_networks_and_vit': ('test_network.py::MultiDeviceTest', 'test_vit.py::MultiDeviceTest'),
    'data_parallel_and_pipeline': ('test_parallel.py::MultiDeviceTest',
                                   'test_stage_pipeline.py::MultiDeviceTest'),
}


@pytest.mark.slow
@pytest.mark.parametrize('group', sorted(GROUPS))
def test_multi_device_classes_on_8_fake_cpu_devices(group):
  if jax.device_count() >= fake_devices.NUM_DEVICES:
    pytest.skip('the multi-device classes run directly in this session')
  fake_devices.run_on_fake_devices(GROUPS[group])
