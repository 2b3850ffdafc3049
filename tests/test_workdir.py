"""experiments/workdir.py: one run per workdir, the config check, metrics truncation on resume."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

import bwbpf_jax as bw
from experiments import config as config_lib
from experiments import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkdirLockTest(absltest.TestCase):

  def test_a_file_as_workdir_is_refused_with_one_line_and_left_alone(self):
    path = self.create_tempfile('not_a_folder', content='mine').full_path
    with self.assertRaisesRegex(bw.UsageError,
                                rf'^workdir {path} is a file, not a folder; use another '
                                r'--workdir$'):
      workdir_lib.WorkdirLock(path)
    with self.assertRaisesRegex(bw.UsageError, rf'is under the file {path}, not a folder'):
      workdir_lib.WorkdirLock(os.path.join(path, 'run'))
    self.assertEqual(open(path).read(), 'mine')

  def test_a_file_as_workdir_exits_2_at_the_command_line(self):
    path = self.create_tempfile('not_a_folder').full_path
    proc = subprocess.run([sys.executable, '-m', 'experiments.main', '--max_steps=1',
                           f'--workdir={path}'], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    self.assertEqual(lines, [f'error: workdir {path} is a file, not a folder; use another '
                             f'--workdir'])

  def test_second_lock_is_refused_naming_the_holder_and_failed_start_leaves_nothing(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'runs', 'one')
    lock = workdir_lib.WorkdirLock(workdir)
    with self.assertRaisesRegex(bw.UsageError, rf'is in use by another run \(host \S+, pid '
                                               rf'{os.getpid()}\)'):
      workdir_lib.WorkdirLock(workdir)
    lock.release()  # Not kept: the folders it created go with it.
    self.assertFalse(os.path.exists(os.path.dirname(workdir)))
    kept = workdir_lib.WorkdirLock(workdir)
    kept.keep()
    kept.release()
    self.assertTrue(os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE)))


class WorkdirContentsTest(absltest.TestCase):

  def test_check_refuses_another_config_but_not_a_resumable_field(self):
    workdir = self.create_tempdir().full_path
    config = config_lib.make_config({'max_steps': 3})
    workdir_lib.write_workdir(config, workdir, overwrite=False, log=print)
    workdir_lib.check_workdir(config_lib.make_config({'max_steps': 3, 'stop_at_step': 2}),
                              workdir, overwrite=False)
    with self.assertRaisesRegex(bw.UsageError, r'different config \(max_steps 3 != 4\)'):
      workdir_lib.check_workdir(config_lib.make_config({'max_steps': 4}), workdir,
                                overwrite=False)
    workdir_lib.check_workdir(config_lib.make_config({'max_steps': 4}), workdir, overwrite=True)

  def test_truncate_drops_later_records_and_a_cut_line(self):
    workdir = self.create_tempdir().full_path
    path = os.path.join(workdir, 'metrics.jsonl')
    with open(path, 'w') as f:
      f.write(''.join(json.dumps({'split': 'train', 'step': s}) + '\n' for s in (2, 4, 6)))
      f.write('{"split": "tr')
    workdir_lib.truncate_metrics(workdir, 4)
    self.assertEqual([json.loads(line)['step'] for line in open(path)], [2, 4])



class WorkdirNameTest(absltest.TestCase):
  """A sweep needs no hand-made --workdir: names hold what runs usually differ in."""

  def test_default_name_holds_dataset_preset_arch_mode_k_head_and_seed(self):
    make, name = config_lib.make_config, workdir_lib.default_workdir
    self.assertEqual(name(make({})), 'runs/digits_vgg11_bwbpf_k4_linear_s0')
    preset = 'cpu_cifar10_vgg11'
    self.assertEqual(name(make({'data_dir': '~/data/cifar10-jpeg/'}, preset), preset),
                     'runs/imagefolder-cifar10-jpeg_cpu_cifar10_vgg11_vgg11_bwbpf_k4_linear_s0')
    self.assertEqual(name(make({'arch': 'mypkg.nets:small_cnn', 'mode': 'bp'})),
                     'runs/digits_small_cnn_bp_k4_linear_s0')
    sweep = [make({'seed': seed, 'num_blocks': k, 'aux_head': head})
             for seed in (0, 1, 2) for k in (2, 4) for head in ('linear', 'dgl')]
    self.assertLen({name(config) for config in sweep}, len(sweep))

  def test_template_names_config_fields(self):
    config = config_lib.make_config({'seed': 3, 'split_points': (2, 5), 'arch': 'a.b:net'})
    self.assertEqual(workdir_lib.expand_workdir('runs/{arch}_k{num_blocks}_s{seed}', config),
                     'runs/net_k3_s3')
    self.assertEqual(workdir_lib.expand_workdir('out/{split_points}_lr{lr:g}', config),
                     'out/2-5_lr0.05')
    self.assertEqual(workdir_lib.expand_workdir('/tmp/plain', config), '/tmp/plain')
    with self.assertRaisesRegex(bw.UsageError, r'^--workdir=runs/\{seeds\} names \{seeds\}, '
                                               r'which is not a config field; did you mean '
                                               r'\{seed\}\?'):
      workdir_lib.expand_workdir('runs/{seeds}', config)
    with self.assertRaisesRegex(bw.UsageError, 'is not a valid template'):
      workdir_lib.expand_workdir('runs/{arch', config)

if __name__ == '__main__':
  absltest.main()
