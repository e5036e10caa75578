"""``s2d_demo_shapes``: an offline, procedurally drawn tfds dataset for the demo.

Each example is a small RGB image of one *large* geometric shape (the class)
drawn in a random colour at a random position, size and slight rotation on a
textured background (plain, gradient, stripes, checks, dots or noise) in
another colour, optionally with a small distractor blob, plus pixel noise; and
a caption in English that names the shape, its colour, size, position and the
background. Features::

  image    uint8 (S, S, 3), PNG-encoded
  label    ClassLabel over the first ``num_classes`` of SHAPES
  color    ClassLabel over COLORS (the shape's colour)
  caption  Text, e.g. "a large red triangle in the top left on a blue striped
           background"

Everything is a function of ``(config.seed, split, index)`` through
``numpy.random.default_rng``; no file is downloaded. The classes are
learnable (shape geometry) but not trivial: colours, textures, positions, sizes
and rotations are nuisance factors shared by all classes, and several pairs of
shapes differ only in details (square / diamond / hexagon, circle / ring /
crescent).

Usage::

  from s2d_jax.data import demo
  builder = demo.build(data_dir)                       # default config
  builder = demo.build(data_dir, demo.ShapesConfig(name="mine", image_size=32,
                       num_train=512, num_test=128))   # custom sizes
  ds = tfds.load("s2d_demo_shapes/tiny", data_dir=data_dir, split="train")

Importing this module registers the builder with tfds.
"""

from __future__ import annotations

import dataclasses
import functools
import io

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star",
          "hexagon", "bar", "crescent")

COLORS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "orange": (240, 140, 30),
    "purple": (140, 60, 190), "white": (240, 240, 240), "black": (20, 20, 20),
    "pink": (240, 130, 190), "cyan": (40, 200, 210), "brown": (130, 80, 40),
    "gray": (128, 128, 128),
}
COLOR_NAMES = tuple(COLORS)
TEXTURES = ("plain", "gradient", "striped", "checkered", "dotted", "noisy")
_SPLITS = {"train": 0, "test": 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Sizes of the demo dataset.

  Attributes:
    image_size: S, images are (S, S, 3).
    num_train: examples in ``train``.
    num_test: examples in ``test``.
    num_classes: number of shape classes (first ``num_classes`` of SHAPES).
    seed: base seed; every example is a function of (seed, split, index).
  """
  image_size: int = 32
  num_train: int = 4096
  num_test: int = 1024
  num_classes: int = 10
  seed: int = 0

  def __post_init__(self):
    if not 2 <= self.num_classes <= len(SHAPES):
      raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got "
                       f"{self.num_classes}")
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8, got {self.image_size}")
    if self.num_train < 1 or self.num_test < 1:
      raise ValueError("num_train and num_test must be >= 1, got "
                       f"{self.num_train}, {self.num_test}")


BUILDER_CONFIGS = [
    ShapesConfig(name="default", description="32x32, 4096 train / 1024 test"),
    ShapesConfig(name="px64", image_size=64,
                 description="64x64, 4096 train / 1024 test"),
    ShapesConfig(name="tiny", image_size=16, num_train=96, num_test=48,
                 description="16x16, 96 train / 48 test (tests)"),
]


# ----------------------------------------------------------------------------
# Drawing (numpy, 2x supersampled for soft edges).


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of ``shape`` in unit coordinates (radius ~1 at the rim)."""
  r = np.hypot(u, v)
  if shape == "circle":
    return r <= 1.0
  if shape == "ring":
    return (r <= 1.0) & (r >= 0.6)
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8
  if shape == "diamond":
    return np.abs(u) + np.abs(v) <= 1.05
  if shape == "triangle":  # apex up (v grows downwards)
    return (v <= 0.75) & (v >= -1.0 + 2 * np.abs(u) / np.sqrt(3) * 1.15)
  if shape == "cross":
    w = 0.33
    return ((np.abs(u) <= w) & (np.abs(v) <= 1.0)) | (
        (np.abs(v) <= w) & (np.abs(u) <= 1.0))
  if shape == "star":
    theta = np.arctan2(v, u)
    return r <= 0.55 + 0.45 * np.cos(5 * theta + np.pi / 2) ** 2
  if shape == "hexagon":
    d = np.max(np.stack([np.abs(u),
                         np.abs(0.5 * u + np.sqrt(3) / 2 * v),
                         np.abs(0.5 * u - np.sqrt(3) / 2 * v)]), axis=0)
    return d <= 0.9
  if shape == "bar":
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.32)
  if shape == "crescent":
    return (r <= 1.0) & (np.hypot(u - 0.5, v - 0.15) > 0.8)
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


@functools.lru_cache(maxsize=8)
def _grid(size: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
  """Read-only (y, x) pixel coordinates ``(index + offset) / size``."""
  yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + offset) / size
  yy.flags.writeable = xx.flags.writeable = False
  return yy, xx


def _background(rng, texture, size, c0, c1):
  yy, xx = _grid(size, 0.0)
  if texture == "plain":
    t = np.zeros((size, size))
  elif texture == "gradient":
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * xx + np.sin(a) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
  elif texture == "striped":
    period = rng.uniform(0.12, 0.3)
    a = rng.uniform(0, np.pi)
    t = ((np.cos(a) * xx + np.sin(a) * yy) / period % 1.0 < 0.5).astype(float)
  elif texture == "checkered":
    period = rng.uniform(0.15, 0.35)
    t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(float)
  elif texture == "dotted":
    period = rng.uniform(0.15, 0.3)
    fx, fy = (xx / period) % 1.0 - 0.5, (yy / period) % 1.0 - 0.5
    t = (np.hypot(fx, fy) < 0.22).astype(float)
  elif texture == "noisy":
    t = rng.uniform(0, 1, (size, size))
  else:
    raise ValueError(texture)
  c0, c1 = np.asarray(c0, float), np.asarray(c1, float)
  return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _where(cx, cy):
  row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle"
  col = "left" if cx < 0.4 else "right" if cx > 0.6 else "center"
  if row == "middle" and col == "center":
    return "in the center"
  if row == "middle":
    return f"on the {col}"
  if col == "center":
    return f"at the {row}"
  return f"in the {row} {col}"


def draw_example(seed: int, split: str, index: int, *, image_size: int = 32,
                 num_classes: int = 10) -> dict:
  """The example ``index`` of ``split``: image uint8 (S, S, 3), label, color, caption."""
  rng = np.random.default_rng([seed, _SPLITS[split], index])
  label = int(rng.integers(num_classes))
  shape = SHAPES[label]
  s = image_size
  fg_i = int(rng.integers(len(COLOR_NAMES)))
  others = [i for i in range(len(COLOR_NAMES)) if i != fg_i]
  bg_i, bg2_i = rng.choice(others, size=2, replace=False)
  texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
  bg = _background(rng, texture, 2 * s, COLORS[COLOR_NAMES[bg_i]],
                   COLORS[COLOR_NAMES[bg2_i]] if texture != "plain" else
                   COLORS[COLOR_NAMES[bg_i]])
  radius = rng.uniform(0.2, 0.4)
  cx, cy = rng.uniform(radius * 0.8, 1 - radius * 0.8, size=2)
  angle = rng.uniform(-np.pi / 12, np.pi / 12)
  yy, xx = _grid(2 * s, 0.5)
  dx, dy = (xx - cx) / radius, (yy - cy) / radius
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy
  mask = _shape_mask(shape, u, v).astype(float)
  fg = np.asarray(COLORS[COLOR_NAMES[fg_i]], float) + rng.normal(0, 12, 3)
  img = bg * (1 - mask[..., None]) + fg * mask[..., None]
  if rng.uniform() < 0.5:  # small distractor blob of a background colour
    bx, by = rng.uniform(0.1, 0.9, size=2)
    blob = np.hypot(xx - bx, yy - by) < rng.uniform(0.04, 0.08)
    img[blob] = COLORS[COLOR_NAMES[bg2_i]]
  img = img.reshape(s, 2, s, 2, 3).mean(axis=(1, 3))
  img = img + rng.normal(0, rng.uniform(2, 10), img.shape)
  image = np.clip(np.round(img), 0, 255).astype(np.uint8)
  size_word = "small" if radius < 0.26 else "large" if radius > 0.34 else "medium"
  fg_name, bg_name = COLOR_NAMES[fg_i], COLOR_NAMES[bg_i]
  bg_words = f"{bg_name} background" if texture == "plain" else (
      f"{bg_name} {texture} background")
  templates = (
      f"a {size_word} {fg_name} {shape} {_where(cx, cy)} on a {bg_words}",
      f"a {fg_name} {shape} on a {bg_words}",
      f"a photo of a {size_word} {shape}, {fg_name}, {_where(cx, cy)}",
      f"{fg_name} {shape}, {texture} {bg_name} backdrop",
  )
  caption = templates[int(rng.integers(len(templates)))]
  return {"image": image, "label": label, "color": fg_i, "caption": caption}


# ----------------------------------------------------------------------------
# The tfds builder.


class S2dDemoShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes with captions (offline, deterministic)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = BUILDER_CONFIGS

  # tfds derives `code_path` (used only to look for a checksums file) through
  # a code path that imports `importlib_resources`, which tfds 4.9.10 does not
  # declare as a dependency. This dataset downloads nothing: give it directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    s = cfg.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=SHAPES[:cfg.num_classes]),
            "color": tfds.features.ClassLabel(names=COLOR_NAMES),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/",  # procedurally generated; no source
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test)}

  def _generate_examples(self, split, n):
    cfg = self.builder_config
    for i in range(n):
      ex = draw_example(cfg.seed, split, i, image_size=cfg.image_size,
                        num_classes=cfg.num_classes)
      ex["image"] = _png_bytes(ex["image"])
      yield i, ex


def _png_bytes(image: np.ndarray) -> bytes:
  """Lossless PNG via PIL (several times faster than tfds' TF-graph encoder)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


NAME = S2dDemoShapes.name
assert NAME == "s2d_demo_shapes", NAME


def build(data_dir: str, config: str | ShapesConfig = "default",
          **config_kwargs) -> tfds.core.DatasetBuilder:
  """Generates the dataset into ``data_dir`` (offline; no-op if already there).

  Args:
    data_dir: tfds data directory.
    config: a predefined config name (``default``, ``px64``, ``tiny``) or a
      :class:`ShapesConfig`.
    **config_kwargs: instead of ``config``: fields of a custom
      :class:`ShapesConfig` (a name is derived from them), e.g.
      ``build(d, image_size=24, num_train=300, num_test=100)``.

  Returns:
    The prepared builder (``builder.as_dataset(split=...)``).
  """
  if config_kwargs:
    if not isinstance(config, str) or config != "default":
      raise ValueError("pass either config or config fields, not both")
    fields = {f.name for f in dataclasses.fields(ShapesConfig)}
    unknown = set(config_kwargs) - fields - {"name", "description"}
    if unknown:
      raise ValueError(f"unknown ShapesConfig fields {sorted(unknown)}")
    base = dataclasses.asdict(BUILDER_CONFIGS[0])
    vals = {k: config_kwargs.get(k, base[k]) for k in
            ("image_size", "num_train", "num_test", "num_classes", "seed")}
    name = config_kwargs.get("name") or (
        "s{image_size}_n{num_train}_{num_test}_c{num_classes}_seed{seed}"
        .format(**vals))
    config = ShapesConfig(name=name, **vals)
  builder = tfds.builder(NAME, config=config, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def caption_tokenizer(builder: tfds.core.DatasetBuilder, prefix: str) -> str:
  """A SentencePiece word model over the training captions (pad 0, unk 1, eos 2).

  Writes `prefix.model` / `prefix.vocab` (atomically: temporary names, then rename)
  and returns the model path; an existing model is reused.
  """
  import os  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if os.path.exists(prefix + ".model"):
    return prefix + ".model"
  captions = [ex["caption"].decode() for ex in tfds.as_numpy(
      builder.as_dataset(split="train"))]
  words = sorted({w for c in captions for w in c.lower().split()})
  tmp = prefix + ".tmp"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_prefix=tmp, model_type="word",
      vocab_size=len(words) + 3, pad_id=0, unk_id=1, eos_id=2, bos_id=-1,
      normalization_rule_name="nmt_nfkc_cf", minloglevel=2)
  for ext in (".model", ".vocab"):
    os.replace(tmp + ext, prefix + ext)
  return prefix + ".model"
