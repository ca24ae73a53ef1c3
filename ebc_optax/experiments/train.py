"""The training loop: one jitted step, metrics one step late, checkpoints.

A run directory holds ``config.json`` (the resolved config), ``vocab.json``,
``metrics.jsonl`` (append-only, one JSON object per logged step),
``summary.json`` and ``checkpoints/<step>/`` (orbax). Batches come from
``fold_in(key, step)``, so the data position of a run is its step and a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ebc_optax
from ebc_optax import cadence
from ebc_optax.experiments import bursts
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import data as data_lib
from ebc_optax.experiments import guards
from ebc_optax.experiments import model as model_lib
from ebc_optax.experiments import optim as optim_lib
from ebc_optax.experiments import writers
from ebc_optax.experiments import spectral as spectral_lib

EBC_SCALARS = ("c", "S", "tau", "delta", "applied_kl", "rho", "guard_factor",
               "probe_count", "clipped_steps", "guard_trips", "nonfinite_skips",
               "rho_tr", "tr_shrunk", "tr_grown", "notfinite_count",
               "total_notfinite")
# Read from the energy clip's state (per layer, in ``Run.energy_layers`` order,
# and the count of steps where a layer was clipped).
ENERGY_METRICS = ("energy_ratio", "energy_scale", "energy_clipped_steps")


class Run(NamedTuple):
  """Everything a run is built from (pure functions and initial values).

  ``apply_with_activations`` is the same forward pass as ``apply_fn`` that
  also returns ``{layer label: activation norm}`` (for the energy arm);
  ``energy_layers`` are all layer labels, embedding/output groups included,
  in the order of the energy clip's per-layer telemetry.
  """
  cfg: config_lib.Config
  dataset: data_lib.CharDataset
  apply_fn: Callable[[Any, Any], jax.Array]
  params: Any
  tx: optax.GradientTransformationExtraArgs
  layers: tuple[str, ...]
  apply_with_activations: model_lib.ApplyWithActivationsFn
  energy_layers: tuple[str, ...]


def load_dataset(cfg: config_lib.Config) -> data_lib.CharDataset:
  d = cfg.data
  if d.dataset == "shakespeare":
    return data_lib.load_shakespeare(d.cache_dir, val_fraction=d.val_fraction)
  if d.dataset == "text":
    return data_lib.load_text_file(d.path, val_fraction=d.val_fraction)
  lang = data_lib.markov_language(d.markov_seed, d.markov_vocab, d.markov_support)
  return data_lib.markov_dataset(lang, d.markov_train_tokens, d.markov_val_tokens,
                                 d.markov_seed)


def build_run(cfg: config_lib.Config,
              dataset: data_lib.CharDataset | None = None) -> Run:
  dataset = load_dataset(cfg) if dataset is None else dataset
  m = cfg.model
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 0)
  fns = model_lib.functional(model_lib.GPT(
      dataset.vocab_size, num_blocks=m.num_blocks, d_embed=m.d_embed,
      num_heads=m.num_heads, seq_len=m.seq_len, positions=m.positions,
      param_dtype=jnp.dtype(m.param_dtype), scan_layers=m.scan_layers,
      rngs=nnx.Rngs(key)))
  tx = optim_lib.build_optimizer(cfg, fns.apply_fn)
  stacked = optim_lib.stacked_layers(cfg)
  return Run(cfg, dataset, fns.apply_fn, fns.params, tx,
             ebc_optax.layers.budget_layers(fns.params, stacked=stacked),
             fns.apply_with_activations,
             ebc_optax.layers.budget_layers(fns.params, include_embed_out=True,
                                     stacked=stacked))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean next-token loss (nats) and accuracy, in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  loss = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
  acc = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))
  return loss, acc


def make_train_step(run: Run):
  cfg = run.cfg
  tokens = jnp.asarray(run.dataset.train, jnp.int32)
  data_key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1)
  burst_key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 2)
  burst_start, burst_steps = cfg.train.burst_window
  other = (jnp.asarray(bursts.other_distribution(run.dataset.vocab_size))
           if cfg.train.burst == "markov" else None)
  use_ebc = cfg.optim.clip == "ebc"
  arm = optim_lib.CLIP_ARMS[cfg.optim.clip]
  use_energy = arm.needs_activation_norms
  use_loss = arm.needs_loss

  def loss_fn(params, inputs, targets):
    if use_energy:  # the activation norms come from the same forward pass
      logits, norms = run.apply_with_activations(params, inputs)
    else:
      logits, norms = run.apply_fn(params, inputs), None
    loss, acc = cross_entropy(logits, targets)
    return loss, (acc, norms)

  @jax.jit
  def train_step(params, opt_state, step):
    inputs, targets = data_lib.sample_batch(
        tokens, data_key, step, cfg.train.batch_size, cfg.model.seq_len)
    inputs, targets = bursts.burst_batch(
        cfg.train.burst, step, inputs, targets, burst_key, start=burst_start,
        steps=burst_steps, vocab_size=run.dataset.vocab_size,
        other_tokens=other)
    (loss, (acc, norms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, inputs, targets)
    extra = {"activation_norms": norms} if use_energy else {}
    if use_loss:
      extra["loss"] = loss
    updates, opt_state = run.tx.update(grads, opt_state, params, batch=inputs,
                                       **extra)
    params = optax.apply_updates(params, updates)
    if cfg.optim.spectral != "none":
      params = spectral_lib.project_params(
          params, cfg.optim.spectral, w_max=cfg.optim.w_max,
          method=cfg.optim.spectral_method, iters=cfg.optim.spectral_iters)
    metrics = {"loss": loss, "acc": acc,
               "decision": guards.decision(opt_state)}
    if use_ebc:
      stats = ebc_optax.telemetry(opt_state)
      metrics.update({k: stats[k] for k in EBC_SCALARS if k in stats})
      metrics["beta"] = stats["beta"]
      metrics["contribution"] = stats["contribution"]
      metrics["ebc_step"] = stats["step"]
    if use_energy:
      for key in ENERGY_METRICS:
        metrics[key] = optax.tree.get(opt_state, key)
    return params, opt_state, metrics

  return train_step


def make_eval_fn(run: Run):
  cfg = run.cfg
  batches = data_lib.eval_batches(run.dataset.val, cfg.train.batch_size,
                                  cfg.model.seq_len, cfg.train.eval_batches)
  if not batches:
    raise ValueError(
        f"The validation split ({len(run.dataset.val)} tokens) is too short for "
        f"one batch of seq_len {cfg.model.seq_len}.")
  inputs = jnp.asarray(np.stack([b[0] for b in batches]), jnp.int32)
  targets = jnp.asarray(np.stack([b[1] for b in batches]), jnp.int32)

  @jax.jit
  def evaluate(params, opt_state):
    """Val loss and accuracy at the run's evaluation point (the parameters,
    or schedule-free's averaged iterate)."""
    point = optim_lib.eval_params(opt_state, params)
    losses, accs = jax.lax.map(
        lambda xy: cross_entropy(run.apply_fn(point, xy[0]), xy[1]),
        (inputs, targets))
    return jnp.mean(losses), jnp.mean(accs)

  return evaluate


# --- checkpoints -------------------------------------------------------------

def _checkpointer():
  import orbax.checkpoint as ocp  # the harness's optional dependency
  return ocp.StandardCheckpointer()


def save_checkpoint(run_dir: pathlib.Path, step: int, params, opt_state,
                    host_state: dict[str, Any]) -> None:
  """Params, optimizer state (EBC's included), step, RNG seed and host stats."""
  ckpt_dir = run_dir / "checkpoints"
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  path = (ckpt_dir / f"{step:08d}").resolve()
  if path.exists():
    shutil.rmtree(path)
  ckpt = _checkpointer()
  ckpt.save(path, {"params": params, "opt_state": opt_state,
                   "step": np.int64(step)})
  ckpt.wait_until_finished()
  (path / "host_state.json").write_text(json.dumps(host_state))


def latest_checkpoint(run_dir: pathlib.Path) -> pathlib.Path | None:
  ckpt_dir = run_dir / "checkpoints"
  if not ckpt_dir.is_dir():
    return None
  done = sorted(p for p in ckpt_dir.iterdir()
                if p.name.isdigit() and (p / "host_state.json").exists())
  return done[-1] if done else None


def restore_checkpoint(path: pathlib.Path, params, opt_state):
  """Restores into the structure of ``(params, opt_state)``."""
  target = {"params": params, "opt_state": opt_state, "step": np.int64(0)}
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), target)
  restored = _checkpointer().restore(path.resolve(), abstract)
  host_state = json.loads((path / "host_state.json").read_text())
  return restored["params"], restored["opt_state"], int(restored["step"]), host_state


# --- the loop ----------------------------------------------------------------

def _progress_bar(enabled: bool, total: int, initial: int, prefix: str
                  ) -> Any:
  """A ``tqdm`` bar on stderr (None when disabled), advanced at each log."""
  if not enabled:
    return None
  from tqdm import auto as tqdm_auto
  return tqdm_auto.tqdm(total=total, initial=initial, desc=prefix.strip() or None,
                        file=sys.stderr, unit="step", dynamic_ncols=True)


def _advance(bar: Any, step: int, loss: float, c: float | None) -> None:
  if bar is None:
    return
  bar.update(step - bar.n)
  bar.set_postfix_str(f"loss {loss:.4f}" + (f" c {c:.3f}" if c is not None else ""),
                      refresh=False)


def _finite_or_none(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def _summary(cfg: config_lib.Config, host: dict[str, Any], status: str,
             val: tuple[float, float] | None, wall: float) -> dict[str, Any]:
  cs = np.asarray(host["c"], np.float64)
  kls = np.asarray(host["probe_kl"], np.float64)
  steps = int(host["steps_done"])
  out: dict[str, Any] = {
      "status": status,
      "diverged": status == "diverged",
      "stalled": status == "stalled",
      "rejected_gradients": int(host.get("total_notfinite", 0)),
      "steps": steps,
      "final_train_loss": _finite_or_none(host["last_loss"]),
      "final_train_acc": _finite_or_none(host["last_acc"]),
      "val_loss": None, "val_acc": None, "val_ppl": None,
      "wall_s": wall,
      # Median step time: robust to the compile step, evaluations and logging.
      "tokens_per_s": _tokens_per_s(cfg, host),
      "lr": cfg.lr,
      # [step, clean val loss] at every evaluation (eval_interval, eval_steps).
      "evals": host.get("evals", []),
      # What the spike guard did (guard_decision): steps it skipped or
      # refused, steps it scaled, and every step's decision in the burst.
      "guard_skipped": host.get("decisions", [0, 0, 0])[2],
      "guard_clipped": host.get("decisions", [0, 0, 0])[1],
      "burst_decisions": host.get("burst_decisions", []),
  }
  if val is not None:
    out.update(val_loss=_finite_or_none(val[0]), val_acc=_finite_or_none(val[1]),
               val_ppl=_finite_or_none(math.exp(min(val[0], 700.0))))
  if cs.size:
    out.update(
        accept_rate=float(np.mean(cs >= 0.999)), avg_c=float(cs.mean()),
        c_p10=float(np.quantile(cs, 0.1)), c_p50=float(np.quantile(cs, 0.5)),
        c_p90=float(np.quantile(cs, 0.9)), eta_eff_mean=float(cs.mean() * cfg.lr),
        probe_fraction=host.get("probe_fraction"))
  else:
    out.update(accept_rate=1.0, avg_c=1.0, c_p10=1.0, c_p50=1.0, c_p90=1.0,
               eta_eff_mean=cfg.lr, probe_fraction=0.0)
  if kls.size:
    out["applied_kl_mean"] = float(kls.mean())
  if kls.size and cfg.ebc.controller != "relative":
    # The relative radius has no target: δ is a threshold, not a KL to hit.
    refs = np.asarray(host.get("probe_kl_ref") or [cfg.ebc.target_kl] * kls.size,
                      np.float64)
    ratio = kls / refs
    out.update(applied_kl_ref_mean=float(refs.mean()),
               applied_kl_over_target_median=float(np.median(ratio)),
               applied_kl_within_30pct=float(np.mean(np.abs(ratio - 1) <= 0.3)),
               target_kl=cfg.ebc.target_kl)
  if cfg.optim.clip == "energy":
    ratio_max = np.asarray(host.get("energy_ratio_max", []), np.float64)
    out.update(
        energy_ratio=cfg.optim.energy_ratio,
        energy_clip_rate=host.get("energy_clipped_steps", 0) / max(steps, 1),
        energy_ratio_max_median=(_finite_or_none(float(np.median(ratio_max)))
                                 if ratio_max.size else None))
  if cfg.data.dataset == "markov" and host.get("entropy_floor") is not None:
    out["entropy_floor"] = host["entropy_floor"]
  return out


def _start(run: Run, run_dir: pathlib.Path, resume: bool
           ) -> tuple[Any, Any, dict[str, Any], int]:
  """``(params, opt_state, host, first step)``: fresh, or from the latest
  checkpoint in ``run_dir`` (``metrics.jsonl`` cut back to it)."""
  params, opt_state = run.params, run.tx.init(run.params)
  host: dict[str, Any] = {
      "c": [], "probe_kl": [], "probe_kl_ref": [], "durations": [], "cadence": [],
      "evals": [],
      "last_loss": float("nan"), "last_acc": float("nan"), "steps_done": 0,
      "entropy_floor": run.dataset.entropy_floor,
      "layers": list(run.layers)}
  metrics_path = run_dir / "metrics.jsonl"
  ckpt = latest_checkpoint(run_dir) if resume else None
  if ckpt is None:
    metrics_path.unlink(missing_ok=True)
    return params, opt_state, host, 0
  params, opt_state, last, host = restore_checkpoint(ckpt, params, opt_state)
  host.setdefault("evals", [])
  if metrics_path.exists():  # drop lines logged after the checkpoint
    keep = [l for l in metrics_path.read_text().splitlines()
            if l and json.loads(l)["step"] <= last]
    metrics_path.write_text("".join(k + "\n" for k in keep))
  return params, opt_state, host, last + 1


class _Recorder:
  """Consumes each finished step's metrics: the host-side lists of the
  summary, the logged record (with an evaluation when due) and the decision
  to stop (``status`` becomes ``"diverged"`` or ``"stalled"``)."""

  def __init__(self, cfg: config_lib.Config, run: Run, host: dict[str, Any],
               evaluate: Callable, log: writers.MetricWriter, bar: Any):
    self.cfg, self.run, self.host, self.evaluate = cfg, run, host, evaluate
    self.log, self.bar = log, bar
    self.use_ebc = cfg.optim.clip == "ebc"
    self.use_energy = optim_lib.CLIP_ARMS[cfg.optim.clip].needs_activation_norms
    self.sweep_every = cadence.sweep_interval(cfg.ebc.full_sweep_every,
                                              len(run.layers))
    host.setdefault("last_probe_count", 0)  # probes recorded (kept in checkpoints)
    self.status = "ok"
    self.t_last = time.perf_counter()

  def evaluate_now(self, step: int) -> bool:
    t = self.cfg.train
    return (step % t.eval_interval == 0 or step == t.steps - 1
            or step in t.eval_steps)

  def __call__(self, step: int, metrics: Any, params_after: Any,
               state_after: Any) -> bool:
    """Records ``step`` (``params_after``/``state_after``: the parameters and
    optimizer state after it, for evaluation); False to stop."""
    m = jax.device_get(metrics)
    now = time.perf_counter()
    self.host["durations"].append(now - self.t_last)
    self.t_last = now
    loss, acc = float(m["loss"]), float(m["acc"])
    self.host.update(last_loss=loss, last_acc=acc, steps_done=step + 1)
    self._tally(step, m)
    diverged = not math.isfinite(loss) or loss > self.cfg.train.diverge_loss
    stalled = (self.use_ebc and self.cfg.train.stall_steps > 0 and not diverged
               and int(m["notfinite_count"]) >= self.cfg.train.stall_steps)
    if (step % self.cfg.log.log_interval == 0 or self.evaluate_now(step)
        or diverged or stalled):
      self.log.write(step, self._record(step, m, params_after, state_after))
      _advance(self.bar, step + 1, loss, float(m["c"]) if self.use_ebc else None)
    if diverged or stalled:
      self.status = "diverged" if diverged else "stalled"
      return False
    return True

  def _tally(self, step: int, m: dict[str, Any]) -> None:
    """The per-step lists and counters of the summary."""
    host, cfg = self.host, self.cfg
    decision = int(m["decision"])
    host.setdefault("decisions", [0, 0, 0])[decision] += 1
    burst_start, burst_len = cfg.train.burst_window
    if cfg.train.burst != "none" and burst_start <= step < burst_start + burst_len:
      host.setdefault("burst_decisions", []).append(decision)
    if self.use_energy:
      # Only layers with an activation entry have a ratio (the harness feeds
      # every layer, so this is all of them).
      ratios = np.asarray(m["energy_ratio"]).tolist()[:len(self.run.energy_layers)]
      host.setdefault("energy_ratio_max", []).append(max(ratios) if ratios else 0.0)
      host["energy_clipped_steps"] = int(m["energy_clipped_steps"])
    if not self.use_ebc:
      return
    host["total_notfinite"] = int(m["total_notfinite"])
    host["c"].append(float(m["c"]))
    host["cadence"].append(cadence.measures(
        int(m["ebc_step"]) - 1, update_every=cfg.ebc.update_every,
        probe_every=cfg.ebc.probe_every, sweep_every=self.sweep_every))
    if int(m.get("probe_count", 0)) > host["last_probe_count"]:
      host["probe_kl"].append(float(m["applied_kl"]))
      # What the applied KL should match: the PI controller's target δ*,
      # otherwise the δ the clip used at this (probed) step (fixed, or
      # adapted by the trust-region controller); the relative radius's δ
      # is a threshold, not a target (_summary leaves it out).
      host["probe_kl_ref"].append(
          cfg.ebc.target_kl if cfg.ebc.controller == "pi" else float(m["delta"]))
      host["last_probe_count"] = int(m["probe_count"])

  def _record(self, step: int, m: dict[str, Any], params_after: Any,
              state_after: Any) -> dict[str, Any]:
    """The line of ``metrics.jsonl`` for ``step``."""
    cfg, host = self.cfg, self.host
    record: dict[str, Any] = {"step": step,
                              "train_loss": _finite_or_none(float(m["loss"])),
                              "train_acc": float(m["acc"]), "lr": cfg.lr}
    if self.evaluate_now(step):
      vl, va = (float(v) for v in self.evaluate(params_after, state_after))
      host["evals"].append([step, _finite_or_none(vl)])
      record.update(val_loss=_finite_or_none(vl), val_acc=va,
                    val_ppl=_finite_or_none(math.exp(min(vl, 700.0))))
    if self.use_ebc:
      # NaN (not measured yet) is logged as null; absent keys stay absent.
      record.update({k: _finite_or_none(float(m[k])) for k in EBC_SCALARS
                     if k in m})
      record["eta_eff"] = _finite_or_none(float(m["c"]) * cfg.lr)
      for key in ("beta", "contribution"):
        record[key] = [_finite_or_none(b) for b in np.asarray(m[key]).tolist()]
    if self.use_energy:
      layers = self.run.energy_layers
      ratios = dict(zip(layers, np.asarray(m["energy_ratio"]).tolist()))
      record["energy_ratios"] = {k: _finite_or_none(v) for k, v in ratios.items()}
      record["energy_ratio_max"] = _finite_or_none(host["energy_ratio_max"][-1])
      record["energy_scale"] = dict(zip(layers, np.asarray(m["energy_scale"]).tolist()))
      record["energy_clipped_steps"] = host["energy_clipped_steps"]
    recent = host["durations"][-cfg.log.log_interval:]
    record["tokens_per_s"] = (cfg.train.batch_size * cfg.model.seq_len
                              * len(recent) / max(sum(recent), 1e-9))
    record["probe_fraction"] = _probe_fraction(host)
    return record


def train(
    cfg: config_lib.Config,
    run_dir: str | pathlib.Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    dataset: data_lib.CharDataset | None = None,
    progress_prefix: str = "",
) -> dict[str, Any]:
  """Trains one run; returns (and writes) its summary.

  Args:
    cfg: the resolved config.
    run_dir: where config, metrics, checkpoints and summary go.
    resume: continue from the latest checkpoint in ``run_dir`` (if any).
    stop_after: stop (as if killed) after this many steps, after writing a
      checkpoint — for tests and for splitting long runs.
    dataset: an already loaded dataset (sweeps load it once).
    progress_prefix: text before the progress bar.

  Returns:
    The summary dict (also in ``summary.json``). A run whose train loss turns
    NaN/inf or exceeds ``train.diverge_loss`` stops with status ``diverged``;
    an EBC run whose last ``train.stall_steps`` gradients were all non-finite
    (each rejected by :func:`ebc_optax.wrap`, so the parameters stopped
    moving) stops with status ``stalled``.
  """
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  run = build_run(cfg, dataset)
  config_lib.save(cfg, run_dir / "config.json")
  data_lib.save_vocab(run.dataset.vocab, run_dir / "vocab.json")
  train_step, evaluate = make_train_step(run), make_eval_fn(run)
  params, opt_state, host, start = _start(run, run_dir, resume)
  steps = cfg.train.steps
  stop_at = steps if stop_after is None else min(steps, start + stop_after)
  t_start = time.perf_counter()
  log = writers.MetricWriter(run_dir, tensorboard=cfg.log.tensorboard,
                             start=start)
  bar = _progress_bar(cfg.log.progress, steps, start, progress_prefix)
  record = _Recorder(cfg, run, host, evaluate, log, bar)

  def checkpoint(step: int) -> None:
    host["probe_fraction"] = _probe_fraction(host)
    save_checkpoint(run_dir, step, params, opt_state, host)

  # A step's metrics are read after the next step is dispatched, so the
  # host's bookkeeping overlaps the device's work.
  prev: tuple[int, Any, Any, Any] | None = None
  try:
    for step in range(start, stop_at):
      params, opt_state, metrics = train_step(params, opt_state, jnp.int32(step))
      if prev is not None and not record(*prev):
        break
      prev = (step, metrics, params, opt_state)
      if (cfg.train.checkpoint_every and step > start
          and step % cfg.train.checkpoint_every == 0 and step + 1 < stop_at):
        keep_going, prev = record(*prev), None
        if not keep_going:
          break
        checkpoint(step)
    if prev is not None and record.status == "ok":
      record(*prev)
  finally:
    log.close()
    if bar is not None:
      bar.close()
  wall = time.perf_counter() - t_start
  host["probe_fraction"] = _probe_fraction(host)
  if record.status == "ok":
    save_checkpoint(run_dir, host["steps_done"] - 1, params, opt_state, host)
    if stop_at < steps:
      return {"status": "stopped", "steps": host["steps_done"]}
  val = (tuple(float(v) for v in evaluate(params, opt_state))
         if record.status == "ok" else None)
  summary = _summary(cfg, host, record.status, val, wall)
  (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _tokens_per_s(cfg: config_lib.Config, host: dict[str, Any]) -> float:
  """Training throughput from the median step time (first step skipped: it
  includes the compilation; evaluation steps are outliers the median ignores)."""
  d = np.asarray(host["durations"][1:] or host["durations"], np.float64)
  if d.size == 0:
    return 0.0
  return cfg.train.batch_size * cfg.model.seq_len / max(float(np.median(d)), 1e-9)


def _probe_fraction(host: dict[str, Any]) -> float:
  """Share of train time spent in EBC's β refreshes and probes.

  Estimated from per-step wall times (measured one step late): the excess of
  steps that ran a refresh or probe over the median of the steps that did not.
  """
  d = np.asarray(host["durations"][1:], np.float64)  # skip the compile step
  flags = np.asarray(host["cadence"][1:], bool)
  if d.size == 0 or flags.size != d.size or flags.all() or not flags.any():
    return 0.0
  base = float(np.median(d[~flags]))
  return float(np.clip(np.sum(d[flags] - base), 0, None) / np.sum(d))
