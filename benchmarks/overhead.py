"""EBC overhead on a small causal transformer, measured side by side.

Prints, for one model and batch:
  * the median step-time ratio (adam + EBC at defaults) / (adam alone), the two
    jitted train steps timed in interleaved blocks in one process;
  * the same with the probes on a quarter of the batch, with only the β
    refreshes or only the applied-KL probes, and with both every step;
  * the cost of one β probe (one layer's JVP) relative to one forward pass;
  * first-call (compile + one step) time and compilation counts (each step must compile once).

Each arm is a jitted train step called once per step (as a trainer does);
blocks of ``--block-steps`` steps of every arm run back to back in each round.

Run:  python benchmarks/overhead.py [--blocks 3 --d 128 --heads 4 --seq 64 --batch 16]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import ebc_optax
from ebc_optax import _layers
from ebc_optax import _sensitivity


def init_gpt(key, vocab, d, blocks, seq):
  keys = iter(jax.random.split(key, 4 + 4 * blocks))
  normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)
  return {
      "tok_embed": normal((vocab, d), 0.02),
      "pos_embed": normal((seq, d), 0.02),
      "blocks": [{
          "ln1": jnp.ones((d,)), "ln2": jnp.ones((d,)),
          "qkv": normal((d, 3 * d), d ** -0.5),
          "proj": normal((d, d), d ** -0.5),
          "fc": normal((d, 4 * d), d ** -0.5),
          "fc_out": normal((4 * d, d), (4 * d) ** -0.5),
      } for _ in range(blocks)],
      "ln_f": jnp.ones((d,)),
      "lm_head": normal((d, vocab), d ** -0.5),
  }


def _norm(x, g):
  return g * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def gpt_logits(params, tokens, heads):
  b, t = tokens.shape
  h = params["tok_embed"][tokens] + params["pos_embed"][:t]
  d = h.shape[-1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for blk in params["blocks"]:
    q, k, v = jnp.split(_norm(h, blk["ln1"]) @ blk["qkv"], 3, -1)
    split = lambda x: x.reshape(b, t, heads, d // heads)
    att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(d // heads)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
    h = h + jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, t, d) @ blk["proj"]
    h = h + jax.nn.gelu(_norm(h, blk["ln2"]) @ blk["fc"]) @ blk["fc_out"]
  return _norm(h, params["ln_f"]) @ params["lm_head"]


def timed(fn, *args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", type=int, default=3)
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--vocab", type=int, default=65)
  parser.add_argument("--rounds", type=int, default=7,
                      help="interleaved timing rounds")
  parser.add_argument("--block-steps", type=int, default=40,
                      help="steps per timed block (a multiple of the cadences)")
  args = parser.parse_args()

  params = init_gpt(jax.random.PRNGKey(0), args.vocab, args.d, args.blocks, args.seq)
  logits_fn = lambda p, x: gpt_logits(p, x, args.heads)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq + 1),
                              0, args.vocab)
  batch = tokens[:, :-1]

  def loss_fn(p):
    logp = jax.nn.log_softmax(logits_fn(p, batch))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  arms = {
      "adam": optax.adam(2e-3),
      "adam+ebc (defaults)": optax.chain(
          optax.adam(2e-3), ebc_optax.ellipsotope_budget_clip(logits_fn, 0.05)),
      "adam+ebc (defaults; probe_batch_size=B/4)": optax.chain(
          optax.adam(2e-3), ebc_optax.ellipsotope_budget_clip(
              logits_fn, 0.05, probe_batch_size=max(1, args.batch // 4))),
      "adam+ebc (beta refreshes only)": optax.chain(
          optax.adam(2e-3), ebc_optax.ellipsotope_budget_clip(
              logits_fn, 0.05, probe_every=0)),
      "adam+ebc (probes only)": optax.chain(
          optax.adam(2e-3), ebc_optax.ellipsotope_budget_clip(
              logits_fn, 0.05, update_every=10**9, full_sweep_every=0)),
      "adam+ebc (every step)": optax.chain(
          optax.adam(2e-3), ebc_optax.ellipsotope_budget_clip(
              logits_fn, 0.05, update_every=1, probe_every=1)),
  }

  def make_step(tx):
    @jax.jit
    def step(params, state):  # one jitted call per step, as a trainer does
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params, batch=batch)
      return optax.apply_updates(params, updates), state
    return step

  def run_block(step, carry):
    for _ in range(args.block_steps):
      carry = step(*carry)
    return jax.block_until_ready(carry)

  runs, carries, compile_s = {}, {}, {}
  for name, tx in arms.items():
    runs[name] = make_step(tx)
    t0 = time.perf_counter()
    carries[name] = jax.block_until_ready(runs[name](params, tx.init(params)))
    compile_s[name] = time.perf_counter() - t0
    carries[name] = run_block(runs[name], carries[name])  # warm up
  times = {name: [] for name in arms}
  for _ in range(args.rounds):
    for name in arms:  # interleaved: one block of each arm per round
      t0 = time.perf_counter()
      carries[name] = run_block(runs[name], carries[name])
      times[name].append((time.perf_counter() - t0) / args.block_steps)

  # One β probe vs one forward pass, per budgeted layer: interleaved rounds,
  # median of the per-round ratios.
  part = _layers.partition_layers(params)
  leaves, treedef = jax.tree.flatten(params)
  forward = jax.jit(logits_fn)
  t_fwd = timed(forward, params, batch, repeats=10)
  probe_ratios = []
  for layer, idx in zip(part.labels, part.leaf_indices):
    direction = [jnp.ones_like(leaves[i]) for i in idx]
    probe = jax.jit(lambda lv, d, b, idx=idx: _sensitivity.directional_logit_change(
        logits_fn, lv, treedef, idx, d, b))
    ratios = [timed(probe, leaves, direction, batch, repeats=10)
              / timed(forward, params, batch, repeats=10) for _ in range(args.rounds)]
    probe_ratios.append((layer, statistics.median(ratios)))

  base = statistics.median(times["adam"])
  print(f"# machine: {platform.machine()} {platform.processor() or ''}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}")
  print(f"# model: {args.blocks} blocks, d {args.d}, {args.heads} heads, "
        f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}; "
        f"{args.rounds} interleaved rounds of {args.block_steps} steps")
  print("arm,median_step_ms,ratio_vs_adam,ratio_p25,ratio_p75,first_call_s,compiles")
  for name in arms:
    med = statistics.median(times[name])
    # Paired per-round ratios: each round ran every arm back to back.
    q = statistics.quantiles([t / b for t, b in zip(times[name], times["adam"])], n=4)
    print(f"{name},{1e3 * med:.2f},{med / base:.3f},{q[0]:.3f},{q[2]:.3f},"
          f"{compile_s[name]:.1f},{runs[name]._cache_size()}")
  print(f"forward_ms,{1e3 * t_fwd:.2f}")
  for layer, ratio in probe_ratios:
    print(f"beta_probe_vs_forward[{layer}],{ratio:.2f}")
  print(f"beta_probe_vs_forward[mean],"
        f"{statistics.mean(r for _, r in probe_ratios):.2f}")


if __name__ == "__main__":
  main()
