"""Multi-device tests on emulated CPU devices, in fresh processes that talk over loopback only.

JAX fixes its device count when it starts, and the suite starts it with one CPU
device (tests/conftest.py); a test class that needs 8 devices runs in a fresh
pytest process with `--xla_force_host_platform_device_count=8`.
"""

import os
import re
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
# Catches a hung subprocess only: the 8-device run takes ~3 minutes alone on 2 cores, and
# the suite runs two tests at a time (pytest -n), which can double that.
SUBPROCESS_TIMEOUT_S = 900


def subprocess_env(**extra) -> dict:
  """This environment without cluster variables JAX would detect, on CPU, the repo importable."""
  env = {name: value for name, value in os.environ.items()
         if not name.startswith(('JAX_COORDINATOR', 'SLURM_', 'OMPI_'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.update(extra)
  return env


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def run_on_fake_devices(test_ids) -> None:
  """Runs the tests `test_ids` name ('file.py::Class', under tests/) in one pytest process
  started with 8 emulated devices; every test must pass, none may skip.

  One launch for every class that needs the devices: each launch pays for Python,
  JAX and the test modules' imports, and a skipped class (one device after all)
  would otherwise pass unseen.
  """
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=8'
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist',
       *(os.path.join(REPO, 'tests', test_id) for test_id in test_ids)],
      env=subprocess_env(XLA_FLAGS=flags.strip()), cwd=REPO, capture_output=True,
      text=True, timeout=SUBPROCESS_TIMEOUT_S)
  report = result.stdout[-6000:] + result.stderr[-3000:]
  assert result.returncode == 0, report
  summary = [line for line in result.stdout.splitlines() if ' passed' in line and ' in ' in line]
  assert summary and re.match(r'\d+ passed(, \d+ warnings?)? in ', summary[-1]), report


WORKER = os.path.join(REPO, 'tests', 'parallel_worker.py')


def run_workers(out_dir: str, *, num_processes: int, local_devices: int,
                engine: str = 'data', extra_args: tuple = ()) -> list:
  """Runs tests/parallel_worker.py as one multi-process JAX run on loopback.

  Returns every process's JSON report, in process order, with what it wrote:
  its trained parameters (host arrays) under 'params' (data engine), or the
  packed states of the stages it holds under 'stages' ({stage: [L]}, pipeline).
  """
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  port = free_port()
  workers = [subprocess.Popen(
      [sys.executable, WORKER, f'--coordinator=127.0.0.1:{port}',
       f'--num_processes={num_processes}', f'--process_id={i}',
       f'--local_devices={local_devices}', f'--out_dir={out_dir}', f'--engine={engine}',
       *extra_args],
      env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(num_processes)]
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=SUBPROCESS_TIMEOUT_S))
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.communicate()
  reports = []
  for worker, (stdout, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    with np.load(os.path.join(out_dir, f'process_{report["process_index"]}.npz')) as saved:
      report['params'] = [saved[f'arr_{i}'] for i in range(len(saved.files))
                          if f'arr_{i}' in saved.files]
      report['stages'] = {int(name[len('stage_'):]): saved[name] for name in saved.files
                          if name.startswith('stage_')}
    reports.append(report)
  return reports
