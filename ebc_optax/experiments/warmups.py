"""The three warm-ups of ``notebooks/experiment.ipynb``, as importable functions.

The reference repository's ``experiment.ipynb`` runs three warm-ups; ours does
the same, offline, and the notebook only calls what is here:

1. :func:`train_mlp` with ``spectral="none", ebc=False``: an MLP classifier on
   scikit-learn's bundled 8×8 digits (:func:`load_digits_split`, no download),
   the unconstrained baseline;
2. :func:`train_mlp` with a spectral projection after every step and EBC
   (``optax.chain(optax.adam(lr), ellipsotope_budget_clip(apply_fn, ...))``):
   for a classifier every example is one "token" and its logits are the class
   logits. :func:`plot_mlp_warmups` draws loss / test accuracy, the largest
   singular value of every weight matrix and ``c`` over training;
3. a character-level GPT with EBC trained by the harness
   (:func:`ebc_optax.experiments.train.train`) from
   :func:`lm_warmup_config`; :func:`plot_lm_run` draws loss, ``c`` and the
   applied KL against its target from the run's ``metrics.jsonl``.

Sizes come from the caller; :func:`smoke_mode` reads ``EBC_NOTEBOOK_SMOKE``
(the tests run the notebook with ``EBC_NOTEBOOK_SMOKE=1``). Needs the
``[experiments]`` extra (flax, matplotlib, scikit-learn).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ebc_optax
from ebc_optax import layers
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import data as data_lib
from ebc_optax.experiments import model as model_lib
from ebc_optax.experiments import plots as plots_lib
from ebc_optax.experiments import spectral as spectral_lib
from ebc_optax.experiments import train as train_lib

SMOKE_ENV_VAR = "EBC_NOTEBOOK_SMOKE"


def smoke_mode() -> bool:
  """Whether ``$EBC_NOTEBOOK_SMOKE`` asks for the smoke size.

  Returns:
    True for ``1``/``true``/``yes``/``on`` (any case), False when unset, empty
    or ``0``/``false``/``no``/``off``.

  Raises:
    ValueError: for any other value (naming the variable).
  """
  raw = os.environ.get(SMOKE_ENV_VAR, "").strip().lower()
  if raw in ("", "0", "false", "no", "off"):
    return False
  if raw in ("1", "true", "yes", "on"):
    return True
  raise ValueError(f"{SMOKE_ENV_VAR} must be 1/true/yes/on or 0/false/no/off; "
                   f"got {raw!r}.")


# --- warm-ups 1 and 2: an MLP on the 8x8 digits ---------------------------------

class DigitsSplit(NamedTuple):
  """A stratified train / test split of scikit-learn's 8×8 digits.

  Attributes:
    x_train: float32 ``[N_train, 64]`` pixel intensities scaled to ``[0, 1]``.
    y_train: int32 ``[N_train]`` labels in ``0..9``.
    x_test: float32 ``[N_test, 64]``.
    y_test: int32 ``[N_test]``.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    """Number of classes (10)."""
    return int(max(self.y_train.max(), self.y_test.max())) + 1

  @property
  def in_dim(self) -> int:
    """Number of input features (64)."""
    return int(self.x_train.shape[1])


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
  """The 1,797 bundled 8×8 digits, split into train and test (no download).

  ``sklearn.datasets.load_digits`` ships with scikit-learn. Pixels (``0..16``)
  are divided by 16; the split is stratified by label and deterministic in
  ``seed``.

  Args:
    test_fraction: the test share, in ``(0, 1)``.
    seed: seed of the shuffle before the split.

  Returns:
    A :class:`DigitsSplit`.

  Example:
    >>> split = load_digits_split()
    >>> split.x_train.shape, split.x_test.shape, split.num_classes
    ((1347, 64), (450, 64), 10)
  """
  from sklearn import datasets, model_selection  # the [experiments] extra

  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
  digits = datasets.load_digits()
  x = (np.asarray(digits.data, np.float32) / 16.0).astype(np.float32)
  y = np.asarray(digits.target, np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  return DigitsSplit(x_train, y_train, x_test, y_test)


def _path_name(path: tuple[Any, ...]) -> str:
  names = [layers.key_name(e) for e in path]
  if names and names[-1] == "kernel":
    names = names[:-1]
  return "/".join(names)


def layer_spectral_norms(params: Any) -> dict[str, jax.Array]:
  r"""The largest singular value of every constrained weight matrix.

  .. math::
    \sigma_{\max}(W_\ell) = \lVert W_\ell\rVert_2 \quad \text{(exact SVD)}

  for the leaves :func:`~ebc_optax.experiments.spectral.project_params`
  constrains: 2-D floating leaves that are not embedding tables.

  Args:
    params: a parameter pytree.

  Returns:
    ``{name: σ_max}`` (float32 scalars) in tree-flatten order; the name is the
    leaf's path joined by ``/`` without a trailing ``kernel``
    (``"blocks/0/linear"``, ``"head"``). Jit-safe.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if (getattr(leaf, "ndim", None) == 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and not spectral_lib.is_embedding_path(path)):
      out[_path_name(path)] = spectral_lib.spectral_norm(leaf, method="svd")
  return out


@dataclasses.dataclass(frozen=True)
class MLPHistory:
  """What :func:`train_mlp` recorded (host numpy arrays).

  Attributes:
    step: int ``[K]``, the steps that were logged (every step).
    train_loss: ``[K]`` mean cross-entropy of the step's batch (nats).
    train_acc: ``[K]`` accuracy on the step's batch.
    sigma_max: ``{matrix name: [K]}``, σ_max of every weight matrix after the
      step (and after the projection, if any).
    c: ``[K]`` EBC's applied scale at every step, or ``None`` without EBC.
    applied_kl: ``[K]`` EBC's applied KL at the last probe, or ``None``.
    eval_step: int ``[E]``, the steps after which the test set was evaluated.
    test_loss: ``[E]`` test cross-entropy.
    test_acc: ``[E]`` test accuracy.
    params: the final parameters.
  """
  step: np.ndarray
  train_loss: np.ndarray
  train_acc: np.ndarray
  sigma_max: dict[str, np.ndarray]
  c: np.ndarray | None
  applied_kl: np.ndarray | None
  eval_step: np.ndarray
  test_loss: np.ndarray
  test_acc: np.ndarray
  params: Any = dataclasses.field(repr=False, default=None)

  @property
  def final_test_acc(self) -> float:
    """Test accuracy after the last step."""
    return float(self.test_acc[-1])


def mlp_optimizer(apply_fn: Callable[[Any, Any], jax.Array], lr: float, *,
                  ebc: bool = False, target_kl: float = 0.05,
                  **ebc_kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """``adam(lr)``, followed by :func:`ebc_optax.ellipsotope_budget_clip` at the
  seeds' recipe (:data:`ebc_optax.SEEDS_RECIPE`) if ``ebc``.

  Args:
    apply_fn: ``(params, x[B, in_dim]) -> logits[B, C]``; every example is one
      token for EBC.
    lr: Adam's learning rate.
    ebc: whether to clip with EBC.
    target_kl: EBC's KL target ``δ*`` (nats per example).
    **ebc_kwargs: further keyword arguments of ``ellipsotope_budget_clip``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``batch=x``.
  """
  parts = [optax.adam(lr)]
  if ebc:
    parts.append(ebc_optax.ellipsotope_budget_clip(apply_fn, **{
        **ebc_optax.SEEDS_RECIPE, "target_kl": target_kl, **ebc_kwargs}))
  elif ebc_kwargs:
    raise ValueError(f"EBC keyword arguments {sorted(ebc_kwargs)} given with "
                     "ebc=False.")
  return optax.chain(*parts)


def train_mlp(
    split: DigitsSplit,
    *,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    hidden: tuple[int, ...] = (128, 128),
    spectral: str = "none",
    w_max: float = 1.0,
    ebc: bool = False,
    target_kl: float = 0.05,
    ebc_kwargs: Mapping[str, Any] | None = None,
    eval_every: int = 50,
    seed: int = 0,
) -> MLPHistory:
  r"""Trains an MLP classifier, optionally constrained, and records its history.

  One jitted step: a batch drawn with ``fold_in(key, step)``, the gradient of
  the cross-entropy, ``adam`` (then EBC if ``ebc``), ``apply_updates``, then
  the spectral projection of every weight matrix if ``spectral != "none"``:

  .. math::
    W_\ell \leftarrow \Pi(W_\ell + c\,\Delta W_\ell), \qquad
    c = \min(1, \tau / S) .

  The step's metrics stay on the device until the end of training, so the
  host never waits for the accelerator.

  Args:
    split: the data (:func:`load_digits_split`).
    steps: optimizer steps (>= 1).
    batch_size: examples per step (drawn with replacement).
    lr: Adam's learning rate.
    hidden: hidden widths of the MLP.
    spectral: a projection of
      :func:`~ebc_optax.experiments.spectral.project_params`
      (``"none"``, ``"spec_normalize"``, ``"hard_cap"``, ``"spec_hammer"``);
      ``σ_1`` is computed exactly (SVD).
    w_max: the cap on every σ_max (``spectral != "none"``).
    ebc: whether to clip the Adam step with EBC.
    target_kl: EBC's KL target per example (nats).
    ebc_kwargs: further keyword arguments of ``ellipsotope_budget_clip``.
    eval_every: evaluate the test set every this many steps (and after the
      last one).
    seed: seed of the initialisation and of the batches.

  Returns:
    An :class:`MLPHistory`.

  Raises:
    ValueError: for an unknown ``spectral``, ``steps < 1`` or
      ``eval_every < 1``.
  """
  if spectral not in spectral_lib.SPECTRAL_METHODS:
    raise ValueError(f"spectral must be one of {spectral_lib.SPECTRAL_METHODS}; "
                     f"got {spectral!r}.")
  for name, value in (("steps", steps), ("batch_size", batch_size),
                      ("eval_every", eval_every)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int; got {value!r}.")
  key = jax.random.PRNGKey(seed)
  apply_fn, params = model_lib.init_mlp(jax.random.fold_in(key, 0), split.in_dim,
                                        split.num_classes, hidden=tuple(hidden))
  tx = mlp_optimizer(apply_fn, lr, ebc=ebc, target_kl=target_kl,
                     **dict(ebc_kwargs or {}))
  x_train, y_train = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
  x_test, y_test = jnp.asarray(split.x_test), jnp.asarray(split.y_test)
  data_key = jax.random.fold_in(key, 1)

  @jax.jit
  def train_step(params, opt_state, step):
    idx = jax.random.randint(jax.random.fold_in(data_key, step), (batch_size,),
                             0, x_train.shape[0])
    x, y = x_train[idx], y_train[idx]
    (loss, acc), grads = jax.value_and_grad(
        lambda p: train_lib.cross_entropy(apply_fn(p, x), y), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, batch=x)
    params = optax.apply_updates(params, updates)
    params = spectral_lib.project_params(params, spectral, w_max=w_max,
                                         method="svd")
    metrics = {"loss": loss, "acc": acc, "sigma": layer_spectral_norms(params)}
    if ebc:
      stats = ebc_optax.telemetry(opt_state)
      metrics.update(c=stats["c"], applied_kl=stats["applied_kl"])
    return params, opt_state, metrics

  @jax.jit
  def evaluate(params):
    return train_lib.cross_entropy(apply_fn(params, x_test), y_test)

  opt_state = tx.init(params)
  records, evals = [], []
  for step in range(steps):
    params, opt_state, metrics = train_step(params, opt_state, jnp.int32(step))
    records.append(metrics)
    if (step + 1) % eval_every == 0 or step == steps - 1:
      evals.append((step, evaluate(params)))
  records, evals = jax.device_get((records, evals))

  def column(name):
    return np.asarray([r[name] for r in records])

  return MLPHistory(
      step=np.arange(steps),
      train_loss=column("loss"),
      train_acc=column("acc"),
      sigma_max={k: np.asarray([r["sigma"][k] for r in records])
                 for k in records[0]["sigma"]},
      c=column("c") if ebc else None,
      applied_kl=column("applied_kl") if ebc else None,
      eval_step=np.asarray([s for s, _ in evals]),
      test_loss=np.asarray([float(e[0]) for _, e in evals]),
      test_acc=np.asarray([float(e[1]) for _, e in evals]),
      params=params,
  )


def _figure(ncols: int, width: float = 4.5, height: float = 3.6):
  # A bare Figure (no pyplot): no global state, no backend switch; IPython's
  # display() renders it in a notebook.
  from matplotlib.figure import Figure  # the [experiments] extra
  fig = Figure(figsize=(width * ncols, height), layout="constrained")
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_mlp_warmups(histories: Mapping[str, MLPHistory], *,
                     w_max: float | None = None):
  """Loss and test accuracy, σ_max per weight matrix, and EBC's ``c``.

  Three panels: train loss (left axis) and test accuracy (markers) per run;
  σ_max of every weight matrix per run (line style per run, color per matrix)
  with the cap ``w_max`` as a dashed line; ``c`` for the runs that used EBC.

  Args:
    histories: ``{run name: history}`` from :func:`train_mlp`.
    w_max: the cap to draw, or None.

  Returns:
    A ``matplotlib.figure.Figure`` (display it, or ``fig.savefig(path)``).
  """
  fig, (ax_loss, ax_sigma, ax_c) = _figure(3)
  styles = ("-", "--", ":", "-.")
  acc_ax = ax_loss.twinx()
  for i, (name, h) in enumerate(histories.items()):
    line, = ax_loss.plot(h.step, h.train_loss, styles[i % 4], lw=1,
                         label=f"{name}: train loss")
    acc_ax.plot(h.eval_step, h.test_acc, "o" + styles[i % 4], ms=3,
                color=line.get_color(), alpha=0.6,
                label=f"{name}: test acc {h.final_test_acc:.3f}")
    for j, (layer, sigma) in enumerate(h.sigma_max.items()):
      ax_sigma.plot(h.step, sigma, styles[i % 4], color=f"C{j}",
                    label=f"{name}: {layer}")
    if h.c is not None:
      ax_c.plot(h.step, h.c, lw=1, label=name)
  ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("train loss (nats)")
  acc_ax.set_ylabel("test accuracy")
  acc_ax.set_ylim(0, 1.02)
  handles = ax_loss.get_legend_handles_labels()
  acc_handles = acc_ax.get_legend_handles_labels()
  ax_loss.legend(handles[0] + acc_handles[0], handles[1] + acc_handles[1],
                 fontsize=7, loc="center right")
  ax_loss.set_title("loss and test accuracy")
  if w_max is not None:
    ax_sigma.axhline(w_max, color="k", ls="--", lw=0.8, label=f"w_max = {w_max}")
  ax_sigma.set_yscale("log")
  ax_sigma.set_xlabel("step")
  ax_sigma.set_ylabel("σ_max")
  ax_sigma.set_title("largest singular value per layer")
  ax_sigma.legend(fontsize=6)
  ax_c.set_ylim(0, 1.05)
  ax_c.set_xlabel("step")
  ax_c.set_ylabel("c = min(1, τ/S)")
  ax_c.set_title("EBC's applied scale")
  if ax_c.lines:
    ax_c.legend(fontsize=7)
  return fig


# --- warm-up 3: a character-level GPT with EBC ----------------------------------

def lm_warmup_dataset(smoke: bool) -> str:
  """The dataset of the GPT warm-up: ``"shakespeare"`` or ``"markov"``.

  Full size always trains on tiny Shakespeare
  (:func:`~ebc_optax.experiments.data.load_shakespeare`: ``$EBC_OPTAX_DATA``,
  else the cache, else a download, sha256-checked in every case). The smoke
  size uses a local copy when there is one (``$EBC_OPTAX_DATA`` or the cache)
  and otherwise the built-in offline Markov language, so it never downloads.

  Args:
    smoke: whether this is the smoke size.

  Returns:
    The value for ``data.dataset``.

  Raises:
    FileNotFoundError, ValueError: when ``$EBC_OPTAX_DATA`` is set but does
      not point to a valid copy (an explicit setting is never skipped).
  """
  if not smoke:
    return "shakespeare"
  if os.environ.get(data_lib.DATA_ENV_VAR):
    data_lib.shakespeare_path(download=False)  # raises if it points nowhere
    return "shakespeare"
  try:
    data_lib.shakespeare_path(download=False)
  except (FileNotFoundError, ValueError):
    return "markov"
  return "shakespeare"


def lm_warmup_config(smoke: bool = False, **sections: Mapping[str, Any]
                     ) -> config_lib.Config:
  """The harness config of the GPT warm-up (EBC on Adam).

  Full size: a 3-block GPT, ``d_embed=256``, 4 heads, context 128 (2.4M
  parameters on tiny Shakespeare's 65 characters), Adam at ``2e-3``, EBC with
  ``δ* = 0.05`` nats/token, 1,000 steps of 8 sequences (about one epoch of
  tiny Shakespeare's training split). Smoke size: 2 blocks
  of width 32, context 32, 12 steps of 4 sequences, β refresh and probe every
  4 steps. The dataset is :func:`lm_warmup_dataset`.

  Args:
    smoke: the smoke variant (for tests).
    **sections: overrides per section, e.g. ``train={"steps": 200}``
      (applied last; unknown keys are errors).

  Returns:
    A validated :class:`~ebc_optax.experiments.config.Config`.
  """
  if smoke:
    base = {
        "model": {"num_blocks": 2, "d_embed": 32, "num_heads": 2, "seq_len": 32},
        "ebc": {"update_every": 4, "probe_every": 4, "full_sweep_every": 8},
        "train": {"steps": 12, "batch_size": 4, "eval_interval": 6,
                  "eval_batches": 2, "checkpoint_every": 0},
        "log": {"log_interval": 2, "progress": False},
    }
  else:
    base = {
        "model": {"num_blocks": 3, "d_embed": 256, "num_heads": 4, "seq_len": 128},
        "train": {"steps": 1000, "batch_size": 8, "eval_interval": 100,
                  "eval_batches": 8, "checkpoint_every": 0},
        "log": {"log_interval": 10, "progress": True},
    }
  base["data"] = {"dataset": lm_warmup_dataset(smoke)}
  base["optim"] = {"optimizer": "adam", "lr": 2e-3, "clip": "ebc",
                   "spectral": "none"}
  base.setdefault("ebc", {})["target_kl"] = 0.05
  cfg = config_lib.merge(config_lib.seeds_config(), base)  # the seeds' warm-up
  return config_lib.validate(config_lib.merge(cfg, sections))


RUN_FILES = ("config.json", "vocab.json", "metrics.jsonl", "summary.json")


def reset_run_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
  """Removes a previous harness run from ``run_dir`` (creating it if needed).

  :func:`~ebc_optax.experiments.train.train` restarts ``metrics.jsonl`` but
  keeps older checkpoints, and sampling reads the latest one: after a run
  with more steps or another model size, that would be the wrong one. Only the
  harness's files (:data:`RUN_FILES` and ``checkpoints/``) are removed.

  Args:
    run_dir: the run directory.

  Returns:
    ``run_dir`` as a path.
  """
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  for name in RUN_FILES:
    (run_dir / name).unlink(missing_ok=True)
  shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
  return run_dir


def plot_lm_run(run_dir: str | pathlib.Path):
  """Loss, ``c`` and the applied KL against its target for a harness run.

  Three panels from the run's ``metrics.jsonl`` and ``config.json``: train
  and validation loss (with the entropy floor of the Markov language, when
  ``summary.json`` has one); ``c`` at the logged steps; the applied KL measured at
  the last probe, the controller's ``δ`` in use and the target ``δ*``
  (``ebc.target_kl``) as a dashed line.

  Args:
    run_dir: a run directory written by
      :func:`ebc_optax.experiments.train.train` with ``optim.clip="ebc"``.

  Returns:
    A ``matplotlib.figure.Figure``.

  Raises:
    FileNotFoundError: when ``run_dir`` holds no ``config.json`` or no
      metrics.
  """
  run_dir = pathlib.Path(run_dir)
  config_path = run_dir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json).")
  cfg = config_lib.from_dict(json.loads(config_path.read_text()))
  records = plots_lib.read_metrics(run_dir)
  if not records:
    raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl records.")
  fig, (ax_loss, ax_c, ax_kl) = _figure(3)
  train = [(r["step"], r["train_loss"]) for r in records
           if r.get("train_loss") is not None]
  val = [(r["step"], r["val_loss"]) for r in records
         if r.get("val_loss") is not None]
  if train:
    ax_loss.plot(*zip(*train), label="train")
  if val:
    ax_loss.plot(*zip(*val), "o-", label="val")
  summary_path = run_dir / "summary.json"
  floor = (json.loads(summary_path.read_text()).get("entropy_floor")
           if summary_path.exists() else None)
  if floor is not None:
    ax_loss.axhline(floor, color="k", ls="--", lw=0.8, label="entropy floor")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("loss (nats/token)")
  ax_loss.set_title(f"{cfg.data.dataset}: loss")
  ax_loss.legend(fontsize=7)
  ebc = [r for r in records if "c" in r]
  if ebc:
    s = [r["step"] for r in ebc]
    ax_c.plot(s, [r["c"] for r in ebc])
    probed = [(r["step"], r["applied_kl"]) for r in ebc
              if r.get("applied_kl") is not None]
    if probed:
      ax_kl.plot(*zip(*probed), label="applied KL (last probe)")
    ax_kl.plot(s, [r["delta"] for r in ebc], label="δ used")
  ax_kl.axhline(cfg.ebc.target_kl, color="k", ls="--", lw=0.8,
                label=f"target δ* = {cfg.ebc.target_kl}")
  ax_c.set_ylim(0, 1.05)
  ax_c.set_xlabel("step")
  ax_c.set_ylabel("c = min(1, τ/S)")
  ax_c.set_title("EBC's applied scale")
  ax_kl.set_yscale("log")
  ax_kl.set_xlabel("step")
  ax_kl.set_ylabel("nats/token")
  ax_kl.set_title("applied KL vs target")
  ax_kl.legend(fontsize=7)
  return fig
