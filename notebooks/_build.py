"""Writes the Colab notebooks in this folder (outputs cleared).

    python notebooks/_build.py          # rewrite every notebook
    python notebooks/_build.py --check  # exit 1 if a committed notebook differs

The notebooks are the product; this script is only how they are kept in sync
(cells as plain strings, one list per notebook). Conventions shared by all
notebooks:

* cell 1 (markdown): title, "Open in Colab" badge, what the notebook shows;
* cell 2 (code, tagged ``parameters``, papermill convention): every knob a
  user (or the test suite) may change — size, dataset, checkpoint path, steps;
* cell 3 (code): installs the package from ``REPO_URL`` unless it already
  imports, prints the JAX backend and devices (TPU / GPU / CPU), and defines
  the small ``show(fig)`` helper;
* every later cell only uses names defined by cells above it, so the notebook
  runs top to bottom (no hidden state).

``tests/test_notebooks.py`` runs each notebook headlessly at a tiny size by
injecting a cell right after the ``parameters`` cell.
"""

from __future__ import annotations

import os
import sys
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
ORG = "YOUR_ORG"  # placeholder GitHub organisation, also in README badges
REPO = f"https://github.com/{ORG}/s2d_jax"


def colab_badge(name: str) -> str:
  url = f"https://colab.research.google.com/github/{ORG}/s2d_jax/blob/main/notebooks/{name}"
  return f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def _src(s: str) -> str:
  return textwrap.dedent(s).strip("\n")


def md(s):
  return nbformat.v4.new_markdown_cell(_src(s))


def code(s):
  return nbformat.v4.new_code_cell(_src(s))


def params(s):
  c = nbformat.v4.new_code_cell(_src(s))
  c.metadata["tags"] = ["parameters"]
  return c


SETUP = '''
# Install s2d_jax from the repository when it is not importable yet (Colab);
# skipped when the package is already installed (e.g. a local checkout).
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("s2d_jax") is None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"],
                 check=True)

import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorFlow (data only)

import jax
import matplotlib.pyplot as plt
from IPython.display import display

%matplotlib inline

print(f"JAX {jax.__version__}, backend {jax.default_backend()!r}, "
      f"{jax.device_count()} device(s):")
for d in jax.devices():
  print("  ", d)


def show(fig):
  """Lays out, displays and closes a matplotlib figure."""
  fig.tight_layout()
  display(fig)
  plt.close(fig)
'''


def repo_url_line() -> str:
  return (f'REPO_URL = "{REPO}"  # placeholder: the git URL of s2d_jax '
          "(your fork / mirror)")


# ============================================================================
# 01: quickstart
# ============================================================================

NB01 = [
    md(f"""
    # S2D quickstart: Selective Spectral Decay in `optax`

    {colab_badge("01_quickstart.ipynb")}

    Large pre-trained ViTs (CLIP, SigLIP, SigLIP2) have a few weight matrices whose
    **largest singular values** dominate: the matching singular directions turn a
    handful of input tokens into huge *activation outliers*, and those outliers ruin
    low-bit quantization (one outlier stretches the quantization grid so every
    other value lands in the same bin). **S2D** (Selective Spectral Decay, Chavan
    et al., CVPR 2026) is a fine-tuning regulariser that shrinks *only* those
    dominant singular values.

    This notebook:
    1. states the method in a few lines of math;
    2. applies `s2d` to a single matrix and checks the decay against its closed form,
       next to plain weight decay;
    3. fine-tunes a small ViT with `optax.chain(s2d(k=1), optax.adamw(...))` on the
       offline demo dataset `s2d_demo_shapes`, watches the top singular values fall,
       and compares accuracy, activation outliers and fake-quant accuracy with
       AdamW + weight decay.

    Runs on any Colab runtime (CPU, GPU or TPU) in a few minutes; change the
    parameters cell below for other sizes.
    """),
    params(f'''
    {repo_url_line()}
    DATA_DIR = "~/tensorflow_datasets"  # where the offline demo dataset is generated
    DATASET_CONFIG = "default"  # s2d_demo_shapes config: "default" (32px), "px64", "tiny"
    MODEL = dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=(8, 8),
                 pool_type="gap")  # ViT size (s2d_jax.models.vit kwargs)
    BATCH_SIZE = 128
    PRETRAIN_STEPS = 2000  # plain AdamW from scratch: our stand-in "pre-trained" model
    FINETUNE_STEPS = 500  # then fine-tune: AdamW + weight decay vs AdamW + S2D
    PRETRAIN_LR = 1e-3
    FINETUNE_LR = 3e-4
    WEIGHT_DECAY = 1e-4
    S2D_STRENGTH = 5e-3  # lambda (coupled form, goes through Adam)
    S2D_POWER = 2.0  # n
    TOY_STEPS = 200  # steps of the single-matrix demo
    EVAL_BATCH = 256
    LOG_EVERY = 20
    SEED = 0
    '''),
    code(SETUP),
    md(r"""
    ## The method

    For a weight matrix in its matrix view $W = U\Sigma V^\top = \sum_r \sigma_r u_r v_r^\top$
    ($\sigma_1 \ge \sigma_2 \ge \dots$) and a power $n > 1$, S2D adds the penalty

    $$\mathcal{L}_{\mathrm{S2D}}(W) = \frac{\lambda}{n+1}\sum_{i\le k}\sigma_i^{\,n+1},
    \qquad
    \frac{\partial \mathcal{L}_{\mathrm{S2D}}}{\partial W} = \lambda \sum_{i\le k}\sigma_i^{\,n}\, u_i v_i^\top .$$

    * With $n = 1$ and *all* singular values this is exactly L2 weight decay
      ($\tfrac{\lambda}{2}\|W\|_F^2$, gradient $\lambda W$). S2D keeps only the top $k$
      components and uses $n > 1$ (the paper: $n=2$), so the push grows with
      $\sigma_i^n$: the largest singular values shrink fastest, the rest of the
      spectrum — where most of the pre-trained knowledge lives — is untouched.
    * On the spectrum alone, gradient flow with step size $\eta$ gives
      $\dot\sigma_i = -\eta\lambda\sigma_i^n$, i.e. for $n = 2$:
      $\sigma_i(t) = \sigma_i(0) / (1 + \eta\lambda\,\sigma_i(0)\, t)$.
    * `s2d_jax.optim.s2d` is an `optax.GradientTransformation`: it adds the gradient
      above to the incoming updates, so `optax.chain(s2d(k=1), optax.adamw(lr))` is the
      paper's (coupled) form. The top singular triplets are tracked by warm-started
      power (subspace) iteration stored in the optimizer state — a few matrix-vector
      products per step instead of an SVD.
    * Attention kernels `(in, heads, head_dim)` and conv kernels `(kh, kw, c_in, c_out)`
      are reshaped to matrices; scanned layers are handled per layer.

    ## 1. One matrix: S2D vs weight decay

    A 256×128 matrix with three dominant singular values (8, 6, 4.5) on top of a flat
    bulk. With no task loss, plain SGD on the S2D gradient ($k=3$) follows the closed
    form above; weight decay, tuned to shrink $\sigma_1$ by the same amount, shrinks
    *every* singular value by the same factor.
    """),
    code('''
    import numpy as np
    import jax.numpy as jnp
    import optax
    from s2d_jax import optim

    rng = np.random.default_rng(SEED)
    rows, cols = 256, 128
    U, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
    V, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    sigma0 = np.concatenate([[8.0, 6.0, 4.5], np.linspace(1.0, 0.25, cols - 3)])
    W0 = {"kernel": jnp.asarray((U * sigma0) @ V.T, jnp.float32)}

    ETA, LAM = 1.0, 2e-3  # SGD step size, S2D strength (lambda); power n = 2

    def run_penalty_only(tx, params, steps):
      """SGD on the regulariser alone (zero task gradient); records tx's state."""
      state = tx.init(params)

      @jax.jit
      def step(params, state):
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, state = tx.update(zeros, state, params)
        return optax.apply_updates(params, updates), state

      traj = []
      for _ in range(steps):
        params, state = step(params, state)
        traj.append(state)
      return params, traj

    s2d_tx = optax.chain(optim.s2d(k=3, strength=LAM, power=2.0), optax.sgd(ETA))
    W_s2d, states = run_penalty_only(s2d_tx, W0, TOY_STEPS)
    # S2D's own running estimates of sigma_1..3 (from the optimizer state):
    tracked = np.stack([np.asarray(optim.sigma_estimates(s)["kernel"]) for s in states])

    # Weight decay with the same final sigma_1: sigma_1 (1 - eta wd)^T = S2D's sigma_1(T).
    s1_final = np.linalg.svd(np.asarray(W_s2d["kernel"]), compute_uv=False)[0]
    wd = (1 - (s1_final / sigma0[0]) ** (1 / TOY_STEPS)) / ETA
    W_wd, _ = run_penalty_only(optax.chain(optax.add_decayed_weights(wd), optax.sgd(ETA)),
                               W0, TOY_STEPS)

    sv = {name: np.linalg.svd(np.asarray(w["kernel"]), compute_uv=False)
          for name, w in [("initial", W0), ("S2D (k=3, n=2)", W_s2d),
                          (f"weight decay ({wd:.2e})", W_wd)]}
    t = np.arange(1, TOY_STEPS + 1)
    closed_form = sigma0[:3, None] / (1 + ETA * LAM * sigma0[:3, None] * t)

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
    for (name, s), style in zip(sv.items(), ["k-", "C0-", "C3--"]):
      ax0.plot(np.arange(1, cols + 1), s, style, label=name)
    ax0.set(xscale="log", yscale="log", xlabel="index i", ylabel="σ_i",
            title="Full spectrum after the run")
    ax0.legend()
    for i in range(3):
      ax1.plot(t, tracked[:, i], f"C{i}", lw=2, label=f"σ_{i + 1} tracked by s2d")
      ax1.plot(t, closed_form[i], "k:", lw=1)
    ax1.plot([], [], "k:", label="σ(0) / (1 + ηλσ(0)t)")
    ax1.set(xlabel="step", ylabel="σ", title="Top singular values during S2D")
    ax1.legend()
    show(fig)
    err = np.abs(tracked[-1] - sv["S2D (k=3, n=2)"][:3]).max()
    print(f"tracked vs exact SVD after {TOY_STEPS} steps: max |error| = {err:.2e}")
    print("bulk (σ_4..σ_128) changed by S2D:",
          float(np.abs(sv["S2D (k=3, n=2)"][3:] - sigma0[3:]).max()))
    '''),
    md("""
    **Left:** S2D lowers the three dominant singular values and leaves the bulk of the
    spectrum exactly where it was; weight decay reaches the same $\\sigma_1$ only by
    scaling the *whole* spectrum down. **Right:** the estimates that `s2d` tracks in
    its state (power iteration, one step per update) follow the closed-form decay
    $\\sigma(0)/(1+\\eta\\lambda\\sigma(0)t)$ (dotted): larger singular values fall
    faster, and they converge towards each other.

    ## 2. A small ViT on the demo dataset

    `s2d_demo_shapes` is a procedurally drawn image dataset (one large shape per image
    on a textured background, with captions) that ships with the package and is
    generated offline. We first train a small ViT with plain AdamW as our stand-in
    for a pre-trained model, then fine-tune it twice from the same weights and the
    same batches: with AdamW + weight decay (baseline) and with
    `optax.chain(s2d(k=1), adamw)`.
    """),
    code('''
    from s2d_jax.data import demo, input_pipeline

    data_dir = os.path.expanduser(DATA_DIR)
    builder = demo.build(data_dir, DATASET_CONFIG)  # offline; a no-op when present
    DATASET = f"s2d_demo_shapes/{DATASET_CONFIG}"
    CLASS_NAMES = builder.info.features["label"].names
    PP = 'decode|value_range(-1, 1)|keep("image", "label")'
    print(DATASET, {k: v.num_examples for k, v in builder.info.splits.items()},
          f"{len(CLASS_NAMES)} classes")

    examples = next(builder.as_dataset(split="train", batch_size=16).as_numpy_iterator())
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
    for ax, img, lab in zip(axes.flat, examples["image"], examples["label"]):
      ax.imshow(img)
      ax.set_title(CLASS_NAMES[lab], fontsize=8)
      ax.axis("off")
    show(fig)
    '''),
    code('''
    from s2d_jax import spectral
    from s2d_jax.models import vit

    model = vit.Model(len(CLASS_NAMES), **MODEL)
    image_size = builder.info.features["image"].shape[0]
    params0 = jax.jit(model.init)(jax.random.PRNGKey(SEED),
                                  jnp.zeros((1, image_size, image_size, 3)))["params"]
    KERNELS = spectral.select_kernels(params0)  # what s2d regularises by default
    print(f"{sum(x.size for x in jax.tree.leaves(params0)):,} parameters; "
          f"{len(KERNELS)} kernels in S2D's default selection")


    def loss_fn(params, batch):
      logits, _ = model.apply({"params": params}, batch["image"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


    @jax.jit
    def top_sigma(params):
      """Exact top-3 singular values of every selected kernel's matrix view."""
      flat = {spectral.path_str(p): x for p, x in spectral.leaves_with_paths(params)}
      return {name: jnp.linalg.svd(view.to_matrix(flat[name].astype(jnp.float32)),
                                   compute_uv=False)[..., :3]
              for name, (_, view) in KERNELS.items()}


    def train(tx, params, steps, start_step=0):
      """Plain training loop; logs loss and exact top singular values."""
      batches = input_pipeline.iterate_train(
          DATASET, "train", preprocess=PP, batch_size=BATCH_SIZE, data_dir=data_dir,
          seed=SEED, start_step=start_step)

      @jax.jit
      def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

      opt_state = tx.init(params)
      log = {"step": [], "loss": [], "sigma": []}
      for i in range(steps + 1):
        if i % LOG_EVERY == 0 or i == steps:
          log["step"].append(i)
          log["sigma"].append(jax.device_get(top_sigma(params)))
        if i == steps:
          break
        params, opt_state, loss = step(params, opt_state, next(batches))
        log["loss"].append(float(loss))
      return params, opt_state, log


    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on biases / LN
    pre_tx = optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, PRETRAIN_LR, max(1, PRETRAIN_STEPS // 10), max(2, PRETRAIN_STEPS)),
        weight_decay=0.0)
    pretrained, _, pre_log = train(pre_tx, params0, PRETRAIN_STEPS)
    print(f"pre-training loss {np.mean(pre_log['loss'][:10]):.3f} -> "
          f"{np.mean(pre_log['loss'][-10:]):.3f}")
    '''),
    md("""
    Now the two fine-tuning runs, from the same pre-trained weights and on the same
    batches. The only difference is the `s2d` link in the chain:

    ```python
    baseline = optax.adamw(lr, weight_decay=wd)
    with_s2d = optax.chain(s2d(k=1, strength=λ, power=2.0), optax.adamw(lr, weight_decay=wd))
    ```
    """),
    code('''
    ft_lr = optax.cosine_decay_schedule(FINETUNE_LR, max(1, FINETUNE_STEPS))
    optimizers = {
        "AdamW + wd": optax.adamw(ft_lr, weight_decay=WEIGHT_DECAY, mask=decay_mask),
        "AdamW + wd + S2D": optax.chain(
            optim.s2d(k=1, strength=S2D_STRENGTH, power=S2D_POWER),
            optax.adamw(ft_lr, weight_decay=WEIGHT_DECAY, mask=decay_mask)),
    }
    finetuned, logs, opt_states = {}, {}, {}
    for run, tx in optimizers.items():
      finetuned[run], opt_states[run], logs[run] = train(
          tx, pretrained, FINETUNE_STEPS, start_step=PRETRAIN_STEPS)
      print(f"{run:18s} final loss {np.mean(logs[run]['loss'][-10:]):.3f}")

    # The s2d state's own sigma_1 estimates agree with the exact SVD:
    est = optim.sigma_estimates(opt_states["AdamW + wd + S2D"])
    exact = logs["AdamW + wd + S2D"]["sigma"][-1]
    gap = max(float(np.max(np.abs(np.asarray(est[k])[..., 0] - exact[k][..., 0])
                          / exact[k][..., 0])) for k in est)
    print(f"largest relative gap between tracked and exact σ_1: {gap:.2%}")
    '''),
    md("""
    ### The top singular values during fine-tuning

    Each line is one kernel (the six with the largest $\\sigma_1$ after
    pre-training), $\\sigma_1$ relative to its pre-trained value. Solid: with S2D;
    dashed: baseline. The right panel shows, for every kernel, $\\sigma_1$ and
    $\\sigma_2$ at the end of fine-tuning relative to the start.
    """),
    code('''
    def sigma_series(log, name, i=0):
      return np.array([s[name].reshape(-1, 3)[:, i].max() for s in log["sigma"]])

    start = pre_log["sigma"][-1]
    top = sorted(KERNELS, key=lambda n: -start[n][..., 0].max())[:6]
    def short(name):  # "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel" -> "b1/mlp/Dense_1"
      for a, b in (("Transformer/", ""), ("/kernel", ""), ("encoderblock_", "b"),
                   ("MultiHeadDotProductAttention_0", "attn"), ("MlpBlock_0", "mlp")):
        name = name.replace(a, b)
      return name

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    for j, name in enumerate(top):
      s_ref = start[name][..., 0].max()
      for run, ls in (("AdamW + wd + S2D", "-"), ("AdamW + wd", "--")):
        ax0.plot(logs[run]["step"], sigma_series(logs[run], name) / s_ref, ls,
                 color=f"C{j}", label=short(name) if ls == "-" else None)
    ax0.plot([], [], "k-", label="S2D")
    ax0.plot([], [], "k--", label="baseline")
    ax0.set(xlabel="fine-tuning step", ylabel="σ_1 / σ_1(pre-trained)",
            title="Largest singular value, six largest kernels")
    ax0.legend(fontsize=7)

    names = sorted(KERNELS, key=lambda n: -start[n][..., 0].max())
    x = np.arange(len(names))
    for k, (run, color) in enumerate((("AdamW + wd", "C7"), ("AdamW + wd + S2D", "C0"))):
      end = logs[run]["sigma"][-1]
      for i, marker in ((0, "o"), (1, "x")):
        r = [end[n].reshape(-1, 3)[:, i].max() / start[n].reshape(-1, 3)[:, i].max()
             for n in names]
        ax1.plot(x, r, marker, color=color, label=f"{run}: σ_{i + 1}")
    ax1.axhline(1.0, color="k", lw=0.5)
    ax1.set(xlabel="kernel (sorted by pre-trained σ_1)", ylabel="end / start",
            title="σ_1 and σ_2 after fine-tuning")
    ax1.legend(fontsize=7)
    show(fig)
    '''),
    md("""
    Under S2D the largest singular value of every kernel falls steadily (the push is
    $\\lambda\\sigma_1^2$, strongest where $\\sigma_1$ is largest); with `k=1` it always
    acts on the *current* top direction, so once $\\sigma_1$ comes down to $\\sigma_2$
    both are pushed down together: the top of the spectrum is flattened. Weight decay
    at the usual strength barely touches the dominant directions.

    ### Does it matter for quantization?

    We evaluate the pre-trained model and both fine-tuned models on the test split in
    float and with fake quantization (`s2d_jax.quant_model.quantized_apply`:
    per-channel weights, per-token activations, patch embedding and head kept at 8
    bits), and record the largest input of every matmul with
    `s2d_jax.capture.capture_matmul_inputs`. Each evaluation function is compiled
    once and reused for the three models. (`02_outliers_and_ptq.ipynb` does the same
    with the evaluator, one `jit` over all devices.)
    """),
    code('''
    from s2d_jax import capture, quant_model

    SETTINGS = ("float", "W8A8", "W6A6", "W4A4")
    test_batches = list(input_pipeline.iterate_eval(
        DATASET, "test", preprocess=PP, batch_size=EVAL_BATCH, data_dir=data_dir))


    def make_correct(setting):
      apply = (model.apply if setting == "float"
               else quant_model.quantized_apply(model.apply, setting))

      @jax.jit
      def correct(params, batch):  # number of right predictions among real examples
        logits, _ = apply({"params": params}, batch["image"])
        return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["_mask"])
      return correct


    @jax.jit
    def matmul_input_max(params, images):  # (the classifier head is left out)
      _, inputs = capture.capture_matmul_inputs(model.apply, {"params": params}, images,
                                                include=lambda path: path[0] != "head")
      return jax.tree.map(lambda x: jnp.max(jnp.abs(x)), inputs)


    correct_fns = {s: make_correct(s) for s in SETTINGS}
    n_test = sum(int(b["_mask"].sum()) for b in test_batches)
    accuracy, act_max = {}, {}
    for run, p in {"pre-trained": pretrained, **finetuned}.items():
      accuracy[run] = {s: sum(int(f(p, b)) for b in test_batches) / n_test
                       for s, f in correct_fns.items()}
      # max over batches (padding rows are zeros, which never raise a max |x|)
      per_batch = [matmul_input_max(p, b["image"]) for b in test_batches]
      act_max[run] = {spectral.path_str(k): float(v) for k, v in spectral.leaves_with_paths(
          jax.tree.map(lambda *xs: np.max(xs), *per_batch))}
      print(f"{run:18s}", "  ".join(f"{s} {100 * a:5.1f}%" for s, a in accuracy[run].items()))
    '''),
    code('''
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(accuracy)
    for j, (run, acc) in enumerate(accuracy.items()):
      ax0.bar(np.arange(len(SETTINGS)) + (j - (len(accuracy) - 1) / 2) * width,
              [100 * acc[s] for s in SETTINGS], width, label=run)
    ax0.set_xticks(np.arange(len(SETTINGS)), SETTINGS)
    ax0.set(ylabel="test top-1 (%)", title="Accuracy, float and fake-quantized")
    ax0.axhline(100 / len(CLASS_NAMES), color="k", ls=":", lw=1, label="chance")
    ax0.legend(fontsize=8)

    layer_names = sorted((n for n in KERNELS if n in act_max["pre-trained"]),
                         key=lambda n: (not n.startswith("embedding"), n))  # stem first
    for run, mx in act_max.items():
      ax1.plot(range(len(layer_names)), [mx[n] for n in layer_names], "o-", ms=3, label=run)
    ax1.set_xticks(range(len(layer_names)), [short(n) for n in layer_names], rotation=90,
                   fontsize=7)
    ax1.set(yscale="log", ylabel="max |x| over the test set",
            title="Largest input to every matmul")
    ax1.legend(fontsize=8)
    show(fig)
    '''),
    md("""
    **Left:** float accuracy of the two fine-tuned models is close; S2D's advantage
    shows at low bit widths, where the baseline's outliers stretch the quantization
    grid. **Right:** the largest input to each matmul (log scale) — the outliers that
    set the quantization step. (On this small, briefly trained model the effect is
    modest; pre-trained SigLIP/SigLIP2 models have outliers in the hundreds or
    thousands, see `02_outliers_and_ptq.ipynb`, and `03_finetune_with_s2d.ipynb`
    runs the paper's full recipe with PCDR-selected $k$ per layer.)
    """),
]


# ============================================================================
# 02: outliers and PTQ
# ============================================================================

NB02 = [
    md(f"""
    # Activation outliers, σ_max, PCDR and post-training quantization of SigLIP

    {colab_badge("02_outliers_and_ptq.ipynb")}

    This notebook loads a big_vision SigLIP checkpoint and looks at *why* it quantizes
    badly:

    1. **per-layer activation outliers** — the largest input of every matmul, and how
       far it sits above the typical value;
    2. **σ_max** — the largest singular value of every weight matrix;
    3. **PCDR** — how much of each layer's outlier outputs comes from its top
       singular components (this decides S2D's $k$ per layer);
    4. **fake-quant accuracy** at W8A8 / W6A6 / W4A4, evaluated by one `jit` over
       all devices of the runtime (TPU cores, GPUs or CPU).

    Accuracy is that of a linear probe trained here on the frozen image tower, on the
    offline demo dataset `s2d_demo_shapes` (generated locally, nothing to download
    besides the checkpoint).

    By default it reads the public SigLIP B/16 224 checkpoint from
    `gs://big_vision/`; set `CHECKPOINT = ""` to generate a tiny random checkpoint
    instead (offline; that is what the test suite does).
    """),
    params(f'''
    {repo_url_line()}
    # big_vision SigLIP / SigLIP2 .npz (gs:// or local); "" = generate a tiny one offline
    CHECKPOINT = "gs://big_vision/siglip/webli_en_b16_224_63724782.npz"
    # Architecture of the generated checkpoint (used only when CHECKPOINT == "")
    TINY_IMAGE = dict(width=64, depth=4, mlp_dim=256, num_heads=4, patch_size=(4, 4),
                      pool_type="map")
    TINY_TEXT = dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=256)
    PLANT_OUTLIER = 30.0  # generated checkpoint only: scale block 1's top MLP direction
    DATA_DIR = "~/tensorflow_datasets"
    DATASET_CONFIG = "default"  # s2d_demo_shapes config: "default" (32px), "px64", "tiny"
    NUM_PROBE_TRAIN = 2048  # training examples for the linear probe
    PROBE_STEPS = 300
    EVAL_BATCH = 128  # global batch, split over all devices
    MAX_EVAL_BATCHES = None  # None = the whole test split
    SETTINGS = ["float", "W8A8", "W6A6", "W4A4"]
    TAU = 0.95  # PCDR threshold (paper)
    WORKDIR = "s2d_02"
    SEED = 0
    '''),
    code(SETUP),
    md("""
    ## 1. Load the checkpoint

    `s2d_jax.models.siglip.load` reads a big_vision two-tower `.npz` (from `gs://` via
    `tf.io.gfile`, or local) and infers the architecture from the parameter shapes.
    Without a checkpoint path we build a tiny two-tower model, initialise it randomly
    and write it with `siglip.save` in the same big_vision layout. A random network has
    no outliers of its own, so (only in that case) we scale the top singular value of
    block 1's second MLP matrix by `PLANT_OUTLIER`: a caricature of what pre-training
    does to SigLIP, so that the plots below have something to show.
    """),
    code('''
    import numpy as np
    import jax.numpy as jnp
    from s2d_jax.data import demo, input_pipeline
    from s2d_jax.models import siglip, two_towers

    data_dir = os.path.expanduser(DATA_DIR)
    builder = demo.build(data_dir, DATASET_CONFIG)  # offline; a no-op when present
    DATASET = f"s2d_demo_shapes/{DATASET_CONFIG}"
    CLASS_NAMES = builder.info.features["label"].names
    os.makedirs(WORKDIR, exist_ok=True)

    if CHECKPOINT:
      ckpt_path = CHECKPOINT
    else:
      ckpt_path = os.path.join(WORKDIR, "tiny_siglip.npz")
      size = builder.info.features["image"].shape[0]
      tiny = two_towers.Model(image=TINY_IMAGE, text=TINY_TEXT, out_dim=(None, TINY_IMAGE["width"]),
                              temperature_init=10.0, bias_init=-10.0)
      p = jax.jit(tiny.init)(jax.random.PRNGKey(SEED), jnp.zeros((1, size, size, 3)),
                             jnp.zeros((1, 16), jnp.int32))["params"]
      p = jax.tree.map(np.asarray, p)
      if PLANT_OUTLIER and TINY_IMAGE["depth"] > 1:
        mlp = p["img"]["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_1"]
        u, s, vt = np.linalg.svd(mlp["kernel"], full_matrices=False)
        s[0] *= PLANT_OUTLIER
        mlp["kernel"] = (u * s) @ vt
      siglip.save(ckpt_path, p)

    model, params = siglip.load(ckpt_path)
    print("checkpoint:", ckpt_path)
    print("image tower:", model.image)
    print("text tower: ", model.text)
    print(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters")
    '''),
    md("""
    ## 2. A classifier on the frozen image tower

    `siglip.load_classifier` returns the image tower as a `vit` model with a new
    zero-initialised linear head. We fit that head (multinomial logistic regression on
    the frozen, MAP-pooled features) on `NUM_PROBE_TRAIN` demo images resized to the
    checkpoint's resolution. The quantization experiments then quantize the whole
    classifier (every matmul of the tower).
    """),
    code('''
    import optax

    clf, clf_params = siglip.load_classifier(ckpt_path, len(CLASS_NAMES))
    grid = int(round(np.sqrt(clf_params["pos_embedding"].shape[1])))
    RES = grid * clf.patch_size[0]  # the checkpoint's resolution
    PP = f'decode|resize({RES})|value_range(-1, 1)|keep("image", "label")'
    ndev = jax.local_device_count()
    eval_bs = max(ndev, EVAL_BATCH // ndev * ndev)  # divisible by the device count


    @jax.jit
    def features(p, images):
      _, out = clf.apply({"params": p}, images)
      return out["pre_logits"]


    feats, labels = [], []
    n_train = min(NUM_PROBE_TRAIN, builder.info.splits["train"].num_examples)
    for b in input_pipeline.iterate_eval(DATASET, f"train[:{n_train}]", preprocess=PP,
                                         batch_size=eval_bs, data_dir=data_dir):
      keep = b["_mask"] > 0
      feats.append(np.asarray(features(clf_params, b["image"]))[keep])
      labels.append(b["label"][keep])
    feats, labels = jnp.asarray(np.concatenate(feats)), jnp.asarray(np.concatenate(labels))
    scale = float(jnp.std(feats)) + 1e-6  # feature scale, for a sensible step size


    @jax.jit
    def fit_probe(feats, labels):
      head = {"kernel": jnp.zeros((feats.shape[1], len(CLASS_NAMES))),
              "bias": jnp.zeros((len(CLASS_NAMES),))}
      opt = optax.adam(0.1 / scale)

      def loss(h):
        logits = feats @ h["kernel"] + h["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

      def step(carry, _):
        h, st = carry
        l, g = jax.value_and_grad(loss)(h)
        u, st = opt.update(g, st, h)
        return (optax.apply_updates(h, u), st), l

      (head, _), losses = jax.lax.scan(step, (head, opt.init(head)), None, PROBE_STEPS)
      return head, losses


    head, probe_losses = fit_probe(feats, labels)
    clf_params = {**clf_params, "head": head}
    print(f"probe: {len(labels)} examples at {RES}px, loss {float(probe_losses[0]):.3f} -> "
          f"{float(probe_losses[-1]):.3f}")
    '''),
    md("""
    ## 3. Float and fake-quant evaluation on all devices

    `s2d_jax.evaluate.evaluate_model` splits every batch over all devices and runs one
    jitted step per setting: the float model (which also records per-layer
    activation statistics, merged exactly across devices and batches) and each fake-
    quant setting `W<w>A<a>` (per-output-channel weights, per-token dynamic activations,
    patch embedding and head at 8 bits; `quant.get_setting` lists the variants, e.g.
    `"W4A4-static"` for per-tensor static activation ranges; the paper's PTQ methods
    are named `"RepQ-ViT/W4A4"` etc.). It also returns σ of every kernel and PCDR on a
    few examples; `s2d_jax.report` formats it.
    """),
    code('''
    from s2d_jax import evaluate, report as report_lib

    report = evaluate.evaluate_model(
        clf.apply, {"params": clf_params},
        input_pipeline.iterate_eval(DATASET, "test", preprocess=PP, batch_size=eval_bs,
                                    data_dir=data_dir),
        settings=SETTINGS, max_batches=MAX_EVAL_BATCHES, pcdr_examples=8, progress=False)
    print(f"{report['devices']['count']} {report['devices']['platform']} "
          f"device(s), {report['batches']} batches of {report['batch_size']}")
    print(report_lib.format_table(report))
    '''),
    md("""
    ## 4. Per-layer activation outliers

    For each encoder block: the largest |input| of each of its matmuls (attention
    q/k/v projection, attention output projection, MLP in, MLP out) over the whole test
    set, and the ratio of the largest |x| to the median |x| of the same tensor. A
    quantizer with one scale per token must cover the largest entry of the token,
    so a ratio of 100 leaves the typical entry with a handful of levels at 4 bits.
    """),
    code('''
    import re

    def block_of(name):
      m = re.search(r"encoderblock_(\\d+)", name)
      return int(m.group(1)) if m else None

    KINDS = {  # label -> module path inside a block
        "attn q/k/v in": "MultiHeadDotProductAttention_0/query",
        "attn out in": "MultiHeadDotProductAttention_0/out",
        "MLP in": "MlpBlock_0/Dense_0",
        "MLP out in": "MlpBlock_0/Dense_1",
    }
    layers = report["layers"]
    depth = 1 + max(block_of(k) for k in layers if block_of(k) is not None)
    blocks = np.arange(depth)

    def per_block(module, stat, kind="input"):
      return [layers.get(f"Transformer/encoderblock_{i}/{module}/{kind}", {}).get(stat, np.nan)
              for i in blocks]

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    for j, (label, module) in enumerate(KINDS.items()):
      ax0.plot(blocks, per_block(module, "max_abs"), "o-", color=f"C{j}", label=label)
      ax1.plot(blocks, per_block(module, "top1_median_ratio"), "o-", color=f"C{j}", label=label)
    ax0.plot(blocks, [layers.get(f"Transformer/encoderblock_{i}/output", {}).get("max_abs", np.nan)
                      for i in blocks], "k--", label="block output (residual)")
    ax0.set(yscale="log", xlabel="block", ylabel="max |x|", title="Largest activation per layer")
    ax1.set(yscale="log", xlabel="block", ylabel="max |x| / median |x|",
            title="How far the outliers stick out")
    ax0.legend(fontsize=8)
    for ax in (ax0, ax1):
      ax.set_xticks(blocks)
    show(fig)

    worst = max(layers, key=lambda k: layers[k]["max_abs"])
    print(f"largest activation {layers[worst]['max_abs']:.1f} at {worst}; "
          f"its widest channels {layers[worst]['top_channels']} "
          f"(ranges {np.round(layers[worst]['top_channel_ranges'], 1).tolist()})")
    '''),
    md("""
    ## 5. σ_max of every weight matrix, and PCDR

    Left: the largest singular value of each kernel's matrix view per block, and the gap
    $\\sigma_1/\\sigma_2$ (a single dominant direction shows up as a large gap).
    Right: PCDR$_k$ — for each layer, the share of its largest outputs
    $A = XW$ explained by the top-$k$ singular components,
    $\\mathrm{PCDR}_k = \\sum_{S} |A^{(k)}| / \\sum_{S} |A|$ over the outlier entries
    $S$. S2D regularises a layer with the smallest $k \\le 3$ whose PCDR reaches
    $\\tau$ (dashed), and leaves layers that never reach it alone.
    """),
    code('''
    weights, ratios = report["weights"], report["pcdr"]
    KERNEL_KINDS = {"query": "MultiHeadDotProductAttention_0/query",
                    "key": "MultiHeadDotProductAttention_0/key",
                    "value": "MultiHeadDotProductAttention_0/value",
                    "attn out": "MultiHeadDotProductAttention_0/out",
                    "MLP in": "MlpBlock_0/Dense_0", "MLP out": "MlpBlock_0/Dense_1"}

    def w_stat(module, stat):
      return [weights.get(f"Transformer/encoderblock_{i}/{module}", {}).get(stat, np.nan)
              for i in blocks]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for j, (label, module) in enumerate(KERNEL_KINDS.items()):
      axes[0].plot(blocks, w_stat(module, "sigma_max"), "o-", color=f"C{j}", label=label)
      axes[1].plot(blocks, w_stat(module, "sigma_ratio_12"), "o-", color=f"C{j}", label=label)
    axes[0].set(yscale="log", xlabel="block", ylabel="σ_max", title="σ_max per kernel")
    axes[1].set(yscale="log", xlabel="block", ylabel="σ_1 / σ_2", title="Spectral gap")
    axes[0].legend(fontsize=8)
    for ax in axes[:2]:
      ax.set_xticks(blocks)

    names = sorted((n for n in ratios if block_of(n) is not None),
                   key=lambda n: (block_of(n), n))
    r = np.array([ratios[n] for n in names])  # (layers, 3)
    k_target = np.where((r >= TAU).any(1), (r >= TAU).argmax(1) + 1, 0)
    for k in range(r.shape[1]):
      axes[2].plot(range(len(names)), r[:, k], "o", ms=4, label=f"PCDR_{k + 1}")
    axes[2].axhline(TAU, color="k", ls="--", lw=1, label=f"τ = {TAU}")
    axes[2].set_xticks(range(len(names)), [
        n.replace("Transformer/encoderblock_", "b").replace("MultiHeadDotProductAttention_0/", "")
         .replace("MlpBlock_0/", "") for n in names], rotation=90, fontsize=6)
    axes[2].set(ylabel="PCDR", title="Dominance of the top singular components")
    axes[2].legend(fontsize=8)
    show(fig)
    print(f"k_target (smallest k with PCDR_k >= {TAU}): "
          f"{np.bincount(k_target, minlength=4).tolist()} layers with k = 0, 1, 2, 3")
    '''),
    md("""
    ## 6. Accuracy against bit width

    Top-1 of the probe classifier on the test split for each setting; the dashed line
    is the float model. The drop at low bit widths is what S2D fine-tuning reduces
    (`03_finetune_with_s2d.ipynb`). Each bar is annotated with the drop in points.
    """),
    code('''
    acc = report["accuracy"]
    quant_names = [n for n in acc if n != "float"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(quant_names, [100 * acc[n] for n in quant_names], color="C0")
    if "float" in acc:
      ax.axhline(100 * acc["float"], color="k", ls="--", label=f"float {100 * acc['float']:.1f}%")
      for b, n in zip(bars, quant_names):
        ax.annotate(f"{100 * (acc[n] - acc['float']):+.1f}", (b.get_x() + b.get_width() / 2,
                    b.get_height()), ha="center", va="bottom", fontsize=9)
    ax.axhline(100 / len(CLASS_NAMES), color="gray", ls=":", label="chance")
    ax.set(ylabel="test top-1 (%)", title=f"Fake-quant accuracy ({report['devices']['count']} "
           f"{report['devices']['platform']} devices)")
    ax.legend()
    show(fig)
    '''),
]

# ============================================================================
# 03: fine-tune with S2D
# ============================================================================

NB03 = [
    md(f"""
    # Fine-tuning with S2D: baseline vs S2D, then post-training quantization

    {colab_badge("03_finetune_with_s2d.ipynb")}

    The paper's recipe with the project's trainer (`s2d_jax.train`) and configs:
    fine-tune the same starting checkpoint twice — **AdamW** (baseline) and
    **AdamW + S2D** — then evaluate both in float and fake-quantized at W8A8 / W6A6 /
    W4A4 (`s2d_jax.evaluate`, one `jit` over all devices), and compare.

    * `SETUP = "demo"` (default, any Colab runtime, a few minutes): the config `demo`, a
      small ViT on the offline demo dataset `s2d_demo_shapes`. The notebook first
      trains the starting checkpoint itself (from scratch, AdamW), exports it as a
      big_vision `.npz`, and fine-tunes both runs from it.
    * `SETUP = "paper"` (TPU runtime): the config `siglip2_b16_384_i1k`, the paper's main
      setup — SigLIP2-B/16 at 384 px from `gs://big_vision/siglip2/siglip2_b16_384.npz`,
      10 epochs of ImageNet-1k, global batch 512. It needs `imagenet2012` prepared in
      `DATA_DIR` (a manual download; tfds cannot fetch it) and, for the full 10
      epochs, a TPU pod slice (see the config file); on a single Colab TPU set
      `FINETUNE_STEPS` to a few hundred to try the pipeline.
    """),
    params(f'''
    {repo_url_line()}
    SETUP = "demo"  # "demo" (config demo, any runtime) or "paper" (SigLIP2-B/16, TPU)
    DEMO_SIZE = "default"  # demo config size: "default" or "tiny"
    DATA_DIR = "~/tensorflow_datasets"  # tfds data_dir (paper: holds a prepared imagenet2012)
    WORKDIR = "s2d_03"  # local directory or gs://bucket/path; one sub-directory per run
    START = "shipped"  # demo: "shipped" (the outlier model s2d_jax/assets/demo_siglip.npz, size "default"), "pretrain" or "scratch"
    PRETRAIN_STEPS = 500  # demo, START="pretrain": AdamW steps from scratch for the starting checkpoint
    FINETUNE_STEPS = 0  # 0 = the config's length (demo: 100 steps, paper: 10 epochs)
    EVAL_MAX_BATCHES = None  # None = the whole evaluation split
    CONFIG_OVERRIDES = {{}}  # dotted config overrides, e.g. {{"lr": 1e-4, "s2d.strength": 1e-3}}
    '''),
    code(SETUP),
    md(r"""
    ## The recipe

    Both runs share everything — starting checkpoint, data order, learning-rate schedule,
    weight decay — except the S2D link in front of AdamW:

    $$g_t \leftarrow \nabla_W \mathcal{L}_{\text{task}} + \lambda \sum_{i \le k_\ell} \sigma_i^{\,n}\, u_i v_i^\top
    \quad\text{for every kernel } W \text{ (layer } \ell\text{)},\qquad
    W \leftarrow \mathrm{AdamW}(g_t),$$

    the gradient of $\frac{\lambda}{n+1}\sum_{i\le k_\ell}\sigma_i^{n+1}$, with the
    paper's $n = 2$, $K_{\max} = 3$, $\tau = 0.95$. Every $m$ steps the trainer captures
    the inputs of every matmul on a training batch and sets each layer's $k_\ell$ to the
    smallest $k \le K_{\max}$ whose PCDR (the share of the layer's outlier outputs
    produced by its top-$k$ singular components) reaches $\tau$ — 0 if none, i.e. that
    layer is not regularised (`pcdr.select_active` → `optim.set_active`, no
    recompilation). The top singular triplets are tracked by power iteration inside the
    optimizer state.

    The configs are the project's `configs/*.py` (big_vision style, `get_config(arg)`),
    installed with the package as `s2d_jax.configs`: `config_utils.load_config` finds
    them by name (`"demo:s2d=True"`), or takes the path of your own copy.
    """),
    code('''
    import json
    import numpy as np
    from s2d_jax import config_utils

    CONFIG_NAME = {"demo": "demo", "paper": "siglip2_b16_384_i1k"}[SETUP]  # shipped configs
    data_dir = os.path.expanduser(DATA_DIR)
    workdir = WORKDIR if "://" in WORKDIR else os.path.abspath(os.path.expanduser(WORKDIR))


    def make_config(s2d: bool, init: str = "", steps: int = 0):
      """The config of one run: the file's get_config(arg) plus this notebook's knobs."""
      arg = f"s2d={s2d}"
      if SETUP == "demo":  # (steps via the arg: the demo scales logging / PCDR refresh with it)
        arg += f",size={DEMO_SIZE},data_dir={data_dir},steps={int(steps)}"
      if init:
        arg += f",init={init}"
      config = config_utils.load_config(f"{CONFIG_NAME}:{arg}")
      if SETUP == "paper":
        config.input.data_dir = config.evaluate.data_dir = data_dir
        if steps:
          config.total_steps, config.total_epochs = int(steps), 0.0
      config.evaluate.max_batches = EVAL_MAX_BATCHES
      return config_utils.apply_overrides(config, dict(CONFIG_OVERRIDES))


    base = make_config(s2d=False)
    print(f"{CONFIG_NAME}: model {dict(base.model)}, init {base.model_init or '(scratch)'}")
    print(f"  data {base.input.data.name}[{base.input.data.split}], batch {base.input.batch_size}, "
          f"lr {base.lr}, wd {base.wd}")
    print(f"  S2D (when enabled): {json.dumps(make_config(s2d=True).s2d.to_dict())}")
    '''),
    md("""
    ## The starting checkpoint

    Demo: the demo dataset is generated offline. `START = "shipped"` (default) starts
    from the model the package ships, `s2d_jax/assets/demo_siglip.npz`: a tiny SigLIP
    two-towers model whose pre-training grew activation outliers (fc2 inputs at 160-300×
    their median; config `demo_pretrain`, see `s2d_jax/assets/README.md`), loaded like a
    released big_vision checkpoint, as the main job does. `"pretrain"` trains the same
    classification config from scratch with plain AdamW for `PRETRAIN_STEPS` steps
    instead (a model without such outliers), `"scratch"` fine-tunes from a random init.
    Both fine-tuning runs load the `.npz` with a fresh zero-initialised head, like the
    paper's ImageNet runs. Paper: the config's public SigLIP2 checkpoint. Runs resume
    from their last orbax checkpoint if the work directory already holds one.
    """),
    code('''
    from s2d_jax import train

    init = ""  # paper: the config's model_init
    if SETUP == "demo":
      from s2d_jax.data import demo
      demo.build(data_dir, base.input.data.name.split("/")[1])  # offline; no-op when present
      if START == "shipped":
        if DEMO_SIZE != "default":
          raise ValueError(f"START='shipped' needs DEMO_SIZE='default' (got {DEMO_SIZE!r})")
        from s2d_jax import main as main_job
        init = main_job.asset(main_job.ASSET_NPZ)
      elif START == "pretrain":
        pre = train.train(make_config(s2d=False, steps=PRETRAIN_STEPS), f"{workdir}/pretrain")
        init = pre["npz"]
      elif START != "scratch":
        raise ValueError(f"START={START!r}: use 'shipped', 'pretrain' or 'scratch'")
    print("fine-tuning starts from", init or base.model_init or "a random init")
    '''),
    md("""
    ## Fine-tune twice

    The trainer logs loss, accuracy, σ_max of the largest kernels and (with S2D) the
    number of active components to `WORKDIR/<run>/metrics.jsonl`, and checkpoints
    with orbax.
    """),
    code('''
    RUNS = {"AdamW": False, "AdamW + S2D": True}
    run_dir = {run: f"{workdir}/{'s2d' if s2d else 'adamw'}" for run, s2d in RUNS.items()}
    configs, results = {}, {}
    for run, s2d in RUNS.items():
      print(f"--- {run}")
      configs[run] = make_config(s2d=s2d, init=init, steps=FINETUNE_STEPS)
      results[run] = train.train(configs[run], run_dir[run])
    '''),
    md("""
    ## Evaluate both

    `s2d_jax.evaluate.evaluate` runs the config's evaluation split in float and at every
    setting of `config.evaluate.settings` (one `jit` over all devices, on the params
    where training left them), records per-layer activation
    statistics, σ of every kernel and PCDR, and writes `report.json` (plus plots) into
    each run's directory.
    """),
    code('''
    from s2d_jax import evaluate, report as report_lib

    reports = {run: evaluate.evaluate(configs[run], run_dir[run], params=results[run]["params"],
                                      mesh=results[run]["mesh"], progress=False)
               for run in RUNS}
    '''),
    md("""
    ## Training curves

    Loss and training accuracy (left, middle), and σ_max of the kernels the trainer
    logs (right): the largest singular values of the S2D run (solid) fall away from the
    baseline's (dashed) while the loss curves stay together.
    """),
    code('''
    from s2d_jax import metrics

    logs = {run: metrics.read_metrics(os.path.join(run_dir[run], "metrics.jsonl"))
            for run in RUNS}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    styles = {"AdamW": "--", "AdamW + S2D": "-"}
    for run, log in logs.items():
      steps = [r["step"] for r in log]
      axes[0].plot(steps, [r["loss"] for r in log], styles[run], label=run)
      axes[1].plot(steps, [100 * r["acc"] for r in log], styles[run], label=run)
      keys = sorted({k for r in log for k in r if k.startswith("sigma_max/")})
      for j, k in enumerate(keys):
        axes[2].plot(steps, [r.get(k, np.nan) for r in log], styles[run], color=f"C{j}",
                     label=k.split("/", 1)[1].replace("Transformer/", "")
                     if run == "AdamW + S2D" else None)
    axes[0].set(xlabel="step", ylabel="training loss", title="Loss")
    axes[1].set(xlabel="step", ylabel="training accuracy (%)", title="Accuracy")
    axes[2].set(xlabel="step", ylabel="σ_max", title="σ_max (solid: S2D, dashed: AdamW)")
    axes[0].legend()
    axes[2].legend(fontsize=6)
    show(fig)
    '''),
    md("""
    ## Quantization: accuracy, outliers, σ_max

    Left: top-1 of both models in float and at each bit width (the number above a bar
    is the drop from that model's float accuracy). Middle: the largest input of every
    matmul per layer over the evaluation split (log scale) — the outliers that set the
    quantization step. Right: σ_max of every kernel.
    """),
    code('''
    settings = list(reports["AdamW"]["accuracy"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.38
    for j, (run, rep) in enumerate(reports.items()):
      acc = rep["accuracy"]
      xs = np.arange(len(settings)) + (j - 0.5) * width
      bars = axes[0].bar(xs, [100 * acc[s] for s in settings], width, label=run)
      for b, s in zip(bars, settings):
        if s != "float":
          axes[0].annotate(f"{100 * (acc[s] - acc['float']):+.1f}",
                           (b.get_x() + width / 2, b.get_height()), ha="center",
                           va="bottom", fontsize=7)
    axes[0].set_xticks(np.arange(len(settings)), settings)
    axes[0].set(ylabel="top-1 (%)", title="Accuracy, float and fake-quantized")
    axes[0].legend(fontsize=8)

    def forward_order(name):
      m = name.split("encoderblock_")
      return (int(m[1].split("/")[0]) if len(m) > 1 else (-1 if "embedding" in name else 1e9), name)

    inputs = sorted((k for k in reports["AdamW"]["layers"] if k.endswith("/input")
                     and not k.startswith("head")), key=forward_order)
    kernels = sorted(reports["AdamW"]["weights"], key=forward_order)
    for run, rep in reports.items():
      axes[1].plot(range(len(inputs)), [rep["layers"][k]["max_abs"] for k in inputs],
                   styles[run], marker="o", ms=3, label=run)
      axes[2].plot(range(len(kernels)), [rep["weights"][k]["sigma_max"] for k in kernels],
                   styles[run], marker="o", ms=3, label=run)
    axes[1].set(yscale="log", xlabel="matmul (forward order)", ylabel="max |input|",
                title="Activation outliers per layer")
    axes[2].set(yscale="log", xlabel="kernel (forward order)", ylabel="σ_max",
                title="σ_max per kernel")
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    show(fig)

    for run, rep in reports.items():
      print(f"{run}:")
      print(report_lib.format_table(rep))
    '''),
    md("""
    ## From here

    * The same runs from a terminal (one line per run; `--config.x=v` overrides any key):

      ```
      python -m s2d_jax.train --config siglip2_b16_384_i1k:s2d=True --workdir gs://BUCKET/s2d
      python -m s2d_jax.evaluate --config siglip2_b16_384_i1k --workdir gs://BUCKET/s2d
      ```
    * `02_outliers_and_ptq.ipynb` looks at one checkpoint's outliers, σ_max and PCDR in
      more detail.
    * On the demo the effect is small and noisy (a few hundred steps of a small model
      with mild outliers); the paper's numbers (SigLIP2-B/16 384, W4A4 ERQ 65.6 → 73.0,
      RepQ-ViT W6A6 58.5 → 80.0) come from the full ImageNet setup.
    """),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": NB01,
    "02_outliers_and_ptq.ipynb": NB02,
    "03_finetune_with_s2d.ipynb": NB03,
}


def build(name: str) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.cells = NOTEBOOKS[name]
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "accelerator": "GPU",
      "colab": {"provenance": [], "name": name},
  }
  for i, c in enumerate(nb.cells):
    c["id"] = f"{os.path.splitext(name)[0][:2]}-cell-{i:02d}"
  nbformat.validate(nb)
  return nb


def main(argv):
  check = "--check" in argv
  bad = []
  for name in NOTEBOOKS:
    text = nbformat.writes(build(name)) + "\n"
    path = os.path.join(HERE, name)
    if check:
      if not os.path.exists(path) or open(path).read() != text:
        bad.append(name)
    else:
      with open(path, "w") as f:
        f.write(text)
      print("wrote", path)
  if bad:
    print("out of date (run python notebooks/_build.py):", ", ".join(bad))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
