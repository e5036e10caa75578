"""Packaging: a wheel built offline carries the configs and assets, installs into an
empty target, and the main job runs from it in an empty folder (no source tree)."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_packages() -> set[str]:
  """Every package of the source tree, with configs/ as s2d_jax.configs."""
  out = {'s2d_jax.configs'}
  for d, _, files in os.walk(os.path.join(ROOT, 's2d_jax')):
    if '__init__.py' in files:
      out.add(os.path.relpath(d, ROOT).replace(os.sep, '.'))
  return out


def test_pyproject_lists_every_package():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    tool = tomllib.load(f)['tool']['setuptools']
  assert set(tool['packages']) == _source_packages()
  assert tool['package-dir'] == {'s2d_jax.configs': 'configs'}


def _run(cmd, cwd, env=None, timeout=600):
  r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                     timeout=timeout, check=False)
  assert r.returncode == 0, f'{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
  return r.stdout


def test_wheel_installs_and_runs_the_main_job_from_an_empty_folder(tmp_path):
  # Build from a copy, so the checkout gets no build/ or egg-info.
  src = tmp_path / 'src'
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      '.git', 'tests', 'notebooks', 'benchmarks', 'workdir*', 'build', 'dist',
      '*.egg-info', '__pycache__', '.pytest_cache'))
  _run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps',
        '--no-build-isolation', '-q', '-w', str(tmp_path / 'dist')], cwd=str(tmp_path))
  wheel = next((tmp_path / 'dist').glob('s2d_jax-*.whl'))
  names = set(zipfile.ZipFile(wheel).namelist())
  for f in ('s2d_jax/configs/demo.py', 's2d_jax/configs/demo_pretrain.py',
            's2d_jax/configs/siglip2_b16_384_i1k.py', 's2d_jax/assets/README.md',
            's2d_jax/assets/demo_siglip.npz', 's2d_jax/assets/demo_captions.model',
            's2d_jax/ptq/__init__.py', 's2d_jax/models/vit.py'):
    assert f in names, f
  site = tmp_path / 'site'
  _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target',
        str(site), str(wheel)], cwd=str(tmp_path))

  empty = tmp_path / 'empty'
  empty.mkdir()
  env = dict(os.environ)
  env['PYTHONPATH'] = str(site)            # the installed copy only, not the checkout
  out = _run([sys.executable, '-c', 'import s2d_jax; print(s2d_jax.__file__)'],
             cwd=str(empty), env=env)
  assert out.strip().startswith(str(site)), out
  out = _run([sys.executable, '-m', 's2d_jax.main', '--workdir', 'w', '--size', 'tiny',
              '--pretrain_steps', '2', '--finetune_steps', '2', '--seeds', '1'],
             cwd=str(empty), env=env)
  assert 'AdamW+S2D' in out
  assert os.path.exists(empty / 'w' / 'results.md')
  assert os.path.exists(empty / 'w' / 'adamw' / 'seed0' / 'report.json')
