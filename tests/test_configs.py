"""Config files and config_utils: parsing, overrides, errors, model shapes."""

import glob
import os
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from absl import flags

from s2d_jax import config_schema
from s2d_jax import config_utils as cu
from s2d_jax import parallel
from s2d_jax import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_'))
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
  if arg is not None and not re.search(r'\bs2d=', open(path).read()):
    pytest.skip('config has no s2d arg')
  spec = path if arg is None else f'{path}:{arg}'
  config = cu.load_config(spec)
  config_schema.validate(config)
  if arg == 's2d=True':
    assert config.s2d.enabled is True
  if arg == 's2d=False':
    assert config.s2d.enabled is False
  # Every key is one of the schema's (overrides of unknown keys fail at start-up).
  assert set(config.keys()) <= set(cu.default_train_config().keys())
  if config.model_name != 'vit':
    return
  res = int(re.search(r'inception_crop\((\d+)', config.input.pp).group(1))
  model = tasks.get(config).build(config)
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
    spec = parallel.fsdp_spec(x.shape, fsdp)
    for d, s in zip(x.shape, tuple(spec) + (None,) * (len(x.shape) - len(spec))):
      if s == 'fsdp':
        assert d % fsdp == 0


def test_docstrings_document_tpu_batch_and_sharding():
  for path in CONFIGS:
    if os.path.basename(path).startswith('demo'):
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
  def parse(argv):
    fv = flags.FlagValues()
    cu.define_flags(fv, workdir_help='w')
    return cu.parse_flags(fv, argv, usage='u'), fv
  c, fv = parse(['--config', f'{path}:s2d=True', '--config.lr=0.5',
                 '--workdir', str(tmp_path), '--process_id=1',
                 '--config.evaluate.settings', 'float,W8A8'])
  assert c.s2d.enabled and c.lr == 0.5 and fv.workdir == str(tmp_path)
  assert fv.process_id == 1 and c.evaluate.settings == ('float', 'W8A8')
  # a shipped config by name, from any directory
  c2, _ = parse(['--config=siglip_b16_224_i1k:s2d=True', '--workdir', 'x'])
  assert c2.s2d.enabled and c2.model.to_dict() == c.model.to_dict() and c2.lr != 0.5
  with pytest.raises(cu.UsageError, match='missing --workdir'):
    parse(['--config', path])
  with pytest.raises(cu.UsageError, match='missing --config'):
    parse(['--workdir', 'x'])
  with pytest.raises(cu.UsageError, match='bogus'):
    parse(['--config', path, '--workdir', 'x', '--bogus=1'])
  # override errors keep the names (key + siblings, expected type)
  with pytest.raises(cu.UsageError, match=r"--config.s2d.stength.*siblings.*strength"):
    parse(['--config', path, '--workdir', 'x', '--config.s2d.stength=1'])
  with pytest.raises(cu.UsageError, match='expected an int'):
    parse(['--config', path, '--workdir', 'x', '--config.input.batch_size=a'])
  with pytest.raises(cu.UsageError, match='unknown config arg'):
    parse(['--config', f'{path}:bogus=1', '--workdir', 'x'])
  with pytest.raises(FileNotFoundError, match='nope.py.*shipped.*demo'):
    cu.load_config('configs/nope.py:s2d=True')
  with pytest.raises(ValueError, match='unknown config arg'):
    cu.load_config(f'{path}:bogus=1')


def test_shipped_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  names = cu.shipped_configs()
  assert {'demo', 'demo_pretrain', 'siglip2_b16_384_i1k'} <= set(names)
  for spec in ('demo:size=tiny', 'demo.py:size=tiny', 'configs/demo.py:size=tiny'):
    assert cu.load_config(spec).input.batch_size == 16, spec
  assert cu.split_spec('demo:s2d=True') == ('demo', 's2d=True')
  assert cu.split_spec('/x/y.py:a=1') == ('/x/y.py', 'a=1')
  assert cu.split_spec('/x/y.py') == ('/x/y.py', None)
  (tmp_path / 'demo.py').write_text(
      'from s2d_jax import config_utils\n'
      'def get_config(arg=None):\n'
      '  c = config_utils.default_train_config()\n  c.seed = 7\n  return c\n')
  assert cu.load_config('demo.py').seed == 7          # a local file wins
  assert cu.load_config('demo:size=tiny').seed == 0   # a bare name is the shipped one


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
    config_schema.validate(c)


def test_validate_config_s2d_and_unknown_keys():
  c = cu.default_train_config()
  c.total_steps = 5
  c.s2d.enabled = True
  c.s2d.tau = 0.0
  with pytest.raises(ValueError, match='s2d.tau'):
    config_schema.validate(c)
  c.s2d.tau = 0.95
  c.bogus = 1
  with pytest.raises(ValueError, match='bogus'):
    config_schema.validate(c)


@pytest.mark.parametrize('key,match', [
    ('s2d.stength', r"config.s2d.stength: unknown key; known keys of config.s2d: "
                    r"\[.*'strength'"),
    ('input.data.splt', r"config.input.data.splt: unknown key.*'split'"),
    ('evaluate.calib_imgs', r"config.evaluate.calib_imgs: unknown key.*'calib_images'"),
    ('model.widht', r"config.model.widht: unknown key.*'width'"),
])
def test_unknown_keys_at_any_depth_are_named(key, match):
  c = cu.load_config('demo:size=tiny')
  node = c
  for part in key.split('.')[:-1]:
    node = node[part]
  with node.ignore_type() if hasattr(node, 'ignore_type') else _nullctx():
    node[key.split('.')[-1]] = 1
  with pytest.raises(ValueError, match=match):
    config_schema.validate(c)


def test_two_towers_model_keys_and_eval_settings_are_checked():
  c = cu.load_config('demo_pretrain:size=tiny')
  config_schema.validate(c)
  c.model.text['widht'] = 3
  with pytest.raises(ValueError, match=r"config.model.text.widht: unknown key"):
    config_schema.validate(c)
  c = cu.load_config('demo:size=tiny')
  for bad, match in (('W4A4-statik', 'W4A4-statik'), ('RepQ-ViT/W4X4', 'W4X4'),
                     ('Nope/W4A4', "unknown method 'Nope'")):
    c.evaluate.settings = ('float', bad)
    with pytest.raises(ValueError, match=f'config.evaluate.settings: .*{match}'):
      config_schema.validate(c)
  c.evaluate.settings = ('float', 'W4A4', 'RepQ-ViT/W4A4', 'ERQ/W4A4')
  config_schema.validate(c)
  c.evaluate.enabled = False
  c.evaluate.settings = ('W4A4-statik',)
  config_schema.validate(c)   # not evaluated: not checked


class _nullctx:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


@pytest.mark.parametrize('key,value,name', [
    ('total_epochs', float('inf'), r'config.total_epochs'),
    ('s2d.power', float('inf'), r'config.s2d.power'),
    ('s2d.strength', float('nan'), r'config.s2d.strength'),
    ('evaluate.tokenizer', {'opts': [1.0, float('-inf')]},
     r'config.evaluate.tokenizer.opts\[1\]'),
])
def test_non_finite_values_are_rejected_at_any_depth(key, value, name):
  """Every float of the config must be finite, named by its dotted key (on main:
  total_epochs=inf and s2d.power=inf passed, and free-form sections were never
  looked at)."""
  c = cu.load_config('demo:size=tiny')
  c.total_steps, c.total_epochs = 0, 1.0
  c.s2d.enabled = True
  node = c
  for part in key.split('.')[:-1]:
    node = node[part]
  with node.ignore_type():
    node[key.split('.')[-1]] = value
  with pytest.raises(ValueError, match=f'^{name}: must be finite, got -?(inf|nan)$'):
    config_schema.validate(c)


def test_non_finite_cli_value_and_allow_nonfinite_flag(tmp_path):
  fv = flags.FlagValues()
  cu.define_flags(fv, workdir_help='w')
  c = cu.parse_flags(fv, ['--config=demo:size=tiny', '--workdir', 'x',
                          '--config.lr=inf', '--config.model_load.allow_nonfinite=True'],
                     usage='u')
  assert c.model_load.allow_nonfinite is True
  with pytest.raises(ValueError, match='config.lr: must be finite, got inf'):
    config_schema.validate(c, training=False)   # at any time, not only training
  c.lr = 1e-3
  config_schema.validate(c)
  with c.model_load.ignore_type():
    c.model_load.allow_nonfinite = 'yes'
  with pytest.raises(ValueError, match='config.model_load.allow_nonfinite: must be '
                     "True or False, got 'yes'"):
    config_schema.validate(c)


def test_config_changes_in_config_terms():
  now = cu.load_config('demo:size=tiny,s2d=True')
  then = cu.config_as_json(now)
  assert cu.config_changes(now, then, 'checkpoint 200') == []
  then['s2d']['k_max'] = int(now.s2d.k_max) + 1
  then['s2d']['enabled'] = False
  then['lr'] = 0.5
  then['gone'] = 'x'
  del then['seed']
  assert cu.config_changes(now, then, 'checkpoint 200') == [
      "gone is not set now, 'x' in checkpoint 200",
      f'lr is {now.lr} now, 0.5 in checkpoint 200',
      's2d is on now, off in checkpoint 200',
      f's2d.k_max is {now.s2d.k_max} now, {now.s2d.k_max + 1} in checkpoint 200',
      f'seed is {now.seed} now, not set in checkpoint 200']
