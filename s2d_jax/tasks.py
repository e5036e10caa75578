"""The per-model differences of training and evaluation, as one table of tasks.

`TASKS[config.model_name]` says which model module to use (looked up by name under
`s2d_jax.models`, each with `Model` and `load(init_params, init_file, model_cfg,
dont_load)`, as big_vision), which batch keys the model takes, the loss, whether it is
a classifier, which evaluation applies and whether QAT is supported. The trainer and
the evaluator never branch on the model name.

Losses (`loss(config, model_output, batch) -> (loss, {'acc': ...})`):

    classification   softmax_xent: mean_b −Σ_c y_bc log softmax(z_b)_c,
                     y = (1−ε)·onehot + ε/C (label smoothing ε); or
                     sigmoid_xent: mean_b −Σ_c [y log σ(z) + (1−y) log σ(−z)];
                     acc = mean_b [argmax z_b = label_b]
    siglip           SigLIP pairwise sigmoid loss of (zimg, ztxt, t, b)
                     (`two_towers.sigmoid_loss`); acc = image→text top-1 in the batch
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def softmax_xent(logits, labels, num_classes, smoothing=0.0):
  """mean_b −Σ_c y_bc log softmax(z_b)_c with y = (1−ε)·onehot + ε/C."""
  y = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    y = y * (1 - smoothing) + smoothing / num_classes
  return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def sigmoid_xent(logits, labels, num_classes):
  """mean_b −Σ_c [y log σ(z) + (1−y) log σ(−z)] (big_vision's sigmoid_xent)."""
  y = jax.nn.one_hot(labels, num_classes)
  ll = y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)
  return -jnp.mean(jnp.sum(ll, axis=-1))


def classification_loss(config, out, batch):
  """Classifier loss (config.loss, label smoothing) and top-1 accuracy."""
  logits = out[0].astype(jnp.float32)
  n = int(config.num_classes)
  if config.loss == 'softmax_xent':
    loss = softmax_xent(logits, batch['label'], n, config.label_smoothing)
  else:
    loss = sigmoid_xent(logits, batch['label'], n)
  return loss, {'acc': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}


def siglip_loss(config, out, batch):  # pylint: disable=unused-argument
  """SigLIP sigmoid loss and image→text retrieval top-1 within the batch."""
  from s2d_jax.models import two_towers  # pylint: disable=g-import-not-at-top
  zimg, ztxt, extra = out
  loss = two_towers.sigmoid_loss(zimg, ztxt, extra['t'], extra.get('b'))
  acc = jnp.mean(jnp.argmax(zimg @ ztxt.T, -1) == jnp.arange(zimg.shape[0]))
  return loss, {'acc': acc}


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}


def _check(cfg: Mapping[str, Any], known: set[str], where: str) -> None:
  for k in sorted(cfg):
    if k not in known:
      raise ValueError(f'{where}.{k}: unknown key; known keys of {where}: '
                       f'{sorted(known)}')


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between models (see the module docstring)."""
  model_module: str                 # module under s2d_jax.models
  inputs: tuple[str, ...]           # batch keys, in the order the model takes them
  loss: Callable[..., Any]          # loss(config, model_output, batch)
  classifier: bool                  # Model(num_classes, **config.model)
  eval_kind: str                    # 'classification' | 'zeroshot'
  qat: bool                         # QAT supported

  def module(self):
    return importlib.import_module(f's2d_jax.models.{self.model_module}')

  def build(self, config):
    """The linen module with `config.model` kwargs (and num_classes, classifiers)."""
    kw = dict(config.model.to_dict() if hasattr(config.model, 'to_dict')
              else config.model)
    if self.classifier:
      return self.module().Model(int(config.num_classes), **kw)
    return self.module().Model(**kw)

  def model_inputs(self, batch: Mapping[str, Any]) -> tuple:
    """Positional model inputs of a batch."""
    return tuple(batch[k] for k in self.inputs)

  def check_model_config(self, model_cfg: Mapping[str, Any]) -> None:
    """Raises ValueError naming `config.model.<key>` for a key the model lacks."""
    from s2d_jax.models import text, two_towers, vit  # pylint: disable=g-import-not-at-top
    model_cfg = dict(model_cfg)
    vit_keys = _fields(vit._Model) | {'variant'}  # pylint: disable=protected-access
    if self.model_module == 'vit':
      _check(model_cfg, vit_keys - {'num_classes'}, 'config.model')
      return
    _check(model_cfg, _fields(two_towers.Model), 'config.model')
    _check(dict(model_cfg.get('image') or {}), vit_keys, 'config.model.image')
    _check(dict(model_cfg.get('text') or {}),
           _fields(text._Model) | {'variant'},  # pylint: disable=protected-access
           'config.model.text')


TASKS: dict[str, Task] = {
    'vit': Task(model_module='vit', inputs=('image',), loss=classification_loss,
                classifier=True, eval_kind='classification', qat=True),
    'two_towers': Task(model_module='two_towers', inputs=('image', 'labels'),
                       loss=siglip_loss, classifier=False, eval_kind='zeroshot',
                       qat=False),
}


def get(config) -> Task:
  """The task of `config.model_name` (a ValueError naming the known ones)."""
  name = config.model_name
  if name not in TASKS:
    raise ValueError(f'config.model_name: {name!r} is not one of {sorted(TASKS)}')
  return TASKS[name]
