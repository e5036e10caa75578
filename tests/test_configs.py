"""Config files and config_utils: parsing, overrides, errors, model shapes."""

import glob
import os
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from s2d_jax import config_utils as cu
from s2d_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
# Image-tower parameter counts (without classifier head), from the ViT tables:
# B/16 ~86M, L/16 ~303M, So400m/14 ~428M (incl. MAP head).
EXPECTED_MPARAMS = {'B/16': (85, 95), 'L/16': (300, 320), 'So400m/14': (410, 440)}


def test_there_are_configs():
  names = {os.path.basename(c) for c in CONFIGS}
  for n in ('siglip2_b16_384_i1k.py', 'siglip_b16_224_i1k.py', 'siglip_l16_384_i1k.py',
            'siglip_so400m14_384_i1k.py', 'siglip2_b16_384_i1k_qat.py', 'demo.py'):
    assert n in names, f'missing configs/{n}'


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 's2d=True', 's2d=False'])
def test_config_parses_validates_and_builds(path, arg):
  if arg is not None and 's2d' not in open(path).read():
    pytest.skip('config has no s2d arg')
  spec = path if arg is None else f'{path}:{arg}'
  config = cu.load_config(spec)
  train.validate_config(config)
  if arg == 's2d=True':
    assert config.s2d.enabled is True
  if arg == 's2d=False':
    assert config.s2d.enabled is False
  # Every key is one of the schema's (overrides of unknown keys fail at start-up).
  assert set(config.keys()) <= set(cu.default_train_config().keys())
  if config.model_name != 'vit':
    return
  res = int(re.search(r'inception_crop\((\d+)', config.input.pp).group(1))
  model = train.build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, res, res, 3), jnp.float32))['params']
  assert shapes['head']['kernel'].shape[-1] == config.num_classes
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  n -= int(np.prod(shapes['head']['kernel'].shape)) + config.num_classes
  variant = config.model.get('variant')
  if variant in EXPECTED_MPARAMS:
    lo, hi = EXPECTED_MPARAMS[variant]
    assert lo <= n / 1e6 <= hi, (variant, n)
  # the patch count implied by the resolution
  patch = int(variant.split('/')[1]) if variant and '/' in variant else None
  if patch:
    assert shapes['pos_embedding'].shape[1] == (res // patch) ** 2
  # sharding rule applies to every leaf (FSDP size from the config).
  fsdp = config.mesh.fsdp
  for x in jax.tree.leaves(shapes):
    spec = train.fsdp_spec(x.shape, fsdp)
    for d, s in zip(x.shape, tuple(spec) + (None,) * (len(x.shape) - len(spec))):
      if s == 'fsdp':
        assert d % fsdp == 0


def test_docstrings_document_tpu_batch_and_sharding():
  for path in CONFIGS:
    if path.endswith('demo.py'):
      continue
    doc = open(path).read().split('"""')[1]
    assert 'TPU' in doc and 'batch' in doc and ('fsdp' in doc or 'data parallel' in doc), path


def test_parse_arg_types_defaults_and_shorthands():
  a = cu.parse_arg('s2d=True,res=224,lr=1e-3,name=x', s2d=False, res=384,
                   lr=0.1, name='y', epochs=(10.0, float))
  assert a.s2d is True and a.res == 224 and a.lr == 1e-3 and a.name == 'x'
  assert a.epochs == 10.0
  assert cu.parse_arg('s2d', s2d=False, res=1).s2d is True       # bare key -> True
  assert cu.parse_arg('224', res=384, s2d=False).res == 224      # bare value -> first
  assert cu.parse_arg(None, res=384).res == 384
  assert cu.parse_arg('s2d=false', s2d=True).s2d is False
  lazy = cu.parse_arg('a=1,b=(1,2)', lazy=True)
  assert lazy.a == 1 and lazy.b == (1, 2)


def test_parse_arg_errors_name_the_key():
  with pytest.raises(ValueError, match='unknown config arg.*typo'):
    cu.parse_arg('typo=1', s2d=False)
  with pytest.raises(ValueError, match='res'):
    cu.parse_arg('res=abc', res=384)
  with pytest.raises(ValueError, match='bool'):
    cu.parse_arg('s2d=maybe', s2d=False)
  with pytest.raises(ValueError, match='given twice'):
    cu.parse_arg('res=1,res=2', res=3)


def test_autotype():
  assert cu.autotype('3') == 3 and cu.autotype('1e-4') == 1e-4
  assert cu.autotype('True') is True and cu.autotype('None') is None
  assert cu.autotype('B/16') == 'B/16' and cu.autotype('(1, 2)') == (1, 2)


def test_apply_overrides_converts_types_and_rejects_unknown():
  c = cu.default_train_config()
  cu.apply_overrides(c, ['lr=1e-4', 'input.batch_size=32', 's2d.enabled=true',
                         'evaluate.settings=float,W8A8', 'model.variant=mu/8',
                         'total_steps=1e2'])
  assert c.lr == 1e-4 and isinstance(c.lr, float)
  assert c.input.batch_size == 32 and c.s2d.enabled is True
  assert c.evaluate.settings == ('float', 'W8A8')
  assert c.model.variant == 'mu/8' and c.total_steps == 100
  with pytest.raises(KeyError, match='lrr'):
    cu.apply_overrides(c, ['lrr=1'])
  with pytest.raises(KeyError, match='input.nope'):
    cu.apply_overrides(c, ['input.nope.x=1'])
  with pytest.raises(ValueError, match='expected an int'):
    cu.apply_overrides(c, ['input.batch_size=3.5'])
  with pytest.raises(ValueError, match='bool'):
    cu.apply_overrides(c, ['s2d.enabled=perhaps'])
  with pytest.raises(ValueError, match='key=value'):
    cu.apply_overrides(c, ['lr'])


def test_parse_cli_and_errors(tmp_path):
  path = os.path.join(ROOT, 'configs', 'siglip_b16_224_i1k.py')
  c, wd, extra = cu.parse_cli(['--config', f'{path}:s2d=True', '--config.lr=0.5',
                               '--workdir', str(tmp_path), '--process_id=1'],
                              extra=('process_id',))
  assert c.s2d.enabled and c.lr == 0.5 and wd == str(tmp_path)
  assert extra == {'process_id': '1'}
  with pytest.raises(ValueError, match='missing --workdir'):
    cu.parse_cli(['--config', path])
  with pytest.raises(ValueError, match='missing --config'):
    cu.parse_cli(['--workdir', 'x'])
  with pytest.raises(ValueError, match='unknown flag --bogus'):
    cu.parse_cli(['--config', path, '--workdir', 'x', '--bogus=1'])
  with pytest.raises(FileNotFoundError, match='nope.py'):
    cu.load_config('configs/nope.py:s2d=True')
  with pytest.raises(ValueError, match='unknown config arg'):
    cu.load_config(f'{path}:bogus=1')


def test_load_config_rejects_non_config(tmp_path):
  p = tmp_path / 'bad.py'
  p.write_text('x = 1\n')
  with pytest.raises(ValueError, match='get_config'):
    cu.load_config(str(p))
  p.write_text('def get_config(arg=None):\n  return {"a": 1}\n')
  with pytest.raises(ValueError, match='ConfigDict'):
    cu.load_config(str(p))


@pytest.mark.parametrize('key,value,match', [
    ('model_name', 'resnet', 'model_name'),
    ('lr', -1.0, 'config.lr'),
    ('loss', 'hinge', 'config.loss'),
    ('warmup_frac', 1.5, 'warmup_frac'),
    ('total_steps', 10, 'exactly one'),  # together with total_epochs
])
def test_validate_config_names_the_key(key, value, match):
  c = cu.default_train_config()
  c.total_epochs = 1.0
  with c.ignore_type():
    c[key] = value
  with pytest.raises(ValueError, match=match):
    train.validate_config(c)


def test_validate_config_s2d_and_unknown_keys():
  c = cu.default_train_config()
  c.total_steps = 5
  c.s2d.enabled = True
  c.s2d.tau = 0.0
  with pytest.raises(ValueError, match='s2d.tau'):
    train.validate_config(c)
  c.s2d.tau = 0.95
  c.bogus = 1
  with pytest.raises(ValueError, match='bogus'):
    train.validate_config(c)
