r"""Our train step against the PyTorch implementation of the same network and objective, side
by side in one process:

  python -m mixskd_jax.benchmark --config=configs/cifar100_resnet18_mixskd.py \
      --config.batch_size=64 --against=torch [--rounds=3 --steps=5 --warmup=2]

For the config's MixSKD step and for the plain cross-entropy step of the same backbone, the
sides run in alternating rounds (ours, PyTorch NCHW, PyTorch channels_last; `rounds` rounds of
`steps` timed steps each, after `warmup` untimed ones per side), on the same batch shape,
float32, and the same number of threads. PyTorch's side is `interop.torch_reference`, the
project's independent implementation of the official model and objective (spec §A-B), with
the official optimizer (Nesterov SGD, coupled weight decay). Printed per side: the median step
and its min/max over all steps, each round's PyTorch/ours ratio, peak memory, and the fraction
of the float32 matmul probe (both sides against the same probe, FLOPs from XLA's analysis of
our step: the same network). Before timing, both sides compute the loss of one batch from the
same weights (PyTorch's, converted), which must agree to float32 rounding.

The PyTorch side is `bench.torch_side`. PyTorch is optional (test-only): without it,
`--against=torch` stops with one line saying how to install its CPU build.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixskd_jax.bench import host as benchmark_host
from mixskd_jax.bench.step import compile_step
from mixskd_jax.bench.torch_side import (LAYOUTS, TorchSide, TorchUnavailable, check_comparable,
                                         load_torch)
from mixskd_jax.config import recipes
from mixskd_jax.data import datasets
from mixskd_jax.method import objective
from mixskd_jax.method.mixing import MixParams


def same_batch_losses(config: ml_collections.ConfigDict, side: TorchSide) -> dict[str, float]:
  """Our loss on PyTorch's batch from PyTorch's current weights (converted), with its lam and
  permutation, next to PyTorch's: {"ours", "torch", "relative_difference"}."""
  from mixskd_jax.interop import convert_state_dict  # pylint: disable=import-outside-toplevel
  from mixskd_jax.models import build_model  # pylint: disable=import-outside-toplevel
  torch = side.torch
  side.set_layout("nchw")
  state = {k: v.detach().cpu().numpy() for k, v in side.model.state_dict().items()}
  for k, d in enumerate(side.discriminators):
    state.update({f"discriminators.{k}.{n}": v.detach().cpu().numpy()
                  for n, v in d.state_dict().items()})
  num_classes = datasets.get_spec(config.data.name).num_classes
  model = build_model(config.model.name, num_classes,
                      discriminator_hidden=config.model.discriminator_hidden)
  variables = convert_state_dict(state, model)
  images, labels = jnp.asarray(side.images), jnp.asarray(side.labels.astype(np.int32))
  with torch.no_grad():
    theirs = float(side.loss())
  if side.mixskd:
    mix = MixParams(lam=jnp.float32(side.lam), perm=jnp.asarray(side.perm, jnp.int32))
    obj = objective.ObjectiveConfig.for_variant(config.objective.variant,
                                                temperature=config.objective.temperature)
    ours = float(objective.apply_mixskd(model, variables, images, labels, mix, obj)[0])
  else:
    from mixskd_jax.method import losses  # pylint: disable=import-outside-toplevel
    from mixskd_jax.interop import export_backbone  # pylint: disable=import-outside-toplevel
    plain = build_model(config.model.name, num_classes, mixskd=False)
    outputs, _ = plain.apply(export_backbone(variables), images, train=True,
                             mutable=["batch_stats"])
    ours = float(jnp.mean(losses.cross_entropy(outputs.logits[-1], labels)))
  return {"ours": ours, "torch": theirs,
          "relative_difference": abs(ours - theirs) / max(abs(theirs), 1e-12)}


def _stats(times: list[float]) -> dict[str, Any]:
  return {"median": statistics.median(times), "min": min(times), "max": max(times),
          "all": times}


def compare_step(config: ml_collections.ConfigDict, *, rounds: int, steps: int, warmup: int,
                 probe_gflops: float) -> dict[str, Any]:
  """One method's step, ours against PyTorch NCHW and channels_last (module docstring)."""
  side = TorchSide(config)
  result = {"same_batch_loss": same_batch_losses(config, side)}
  ours_info, runner = compile_step(config)
  flops = ours_info["flops_per_step_per_device"]
  per_round: dict[str, list[list[float]]] = {"ours": [], **{k: [] for k in LAYOUTS}}
  for r in range(rounds):
    per_round["ours"].append(runner.time(steps=steps, warmup=warmup if r == 0 else 1))
    for layout in LAYOUTS:
      side.set_layout(layout)
      per_round[layout].append(side.time(steps=steps, warmup=warmup if r == 0 else 1))
  sides = {}
  for name, rounds_times in per_round.items():
    times = [t for rt in rounds_times for t in rt]
    stats = _stats(times)
    if flops is not None:
      stats["fraction_of_matmul_probe"] = flops / stats["median"] / (probe_gflops * 1e9)
    sides[name] = stats
  ours_rounds = [statistics.median(t) for t in per_round["ours"]]
  for layout in LAYOUTS:
    ratios = [statistics.median(t) / o for t, o in zip(per_round[layout], ours_rounds)]
    sides[layout]["ratio_over_ours"] = {"median": statistics.median(ratios),
                                        "min": min(ratios), "max": max(ratios),
                                        "rounds": ratios}
  side.set_layout("nchw")
  sides["ours"]["peak_bytes"] = ours_info["memory"].get("peak_bytes")
  persistent = side.persistent_bytes()
  for layout in LAYOUTS:
    side.set_layout(layout)
    sides[layout]["peak_bytes"] = persistent + side.peak_step_bytes()
  result.update(sides=sides, flops_per_step=flops, method=ours_info["method"])
  return result


def start_result(config: ml_collections.ConfigDict, *, skip_ce: bool, label: str
                 ) -> tuple[dict[str, Any], list[ml_collections.ConfigDict]]:
  """What both PyTorch comparisons (this one and `bench.breakdown`) begin with: the config
  checked, PyTorch on as many threads as JAX uses, and the result's header (machine, versions,
  the matmul probe, the config); then the steps to run, the config's and (unless `skip_ce`) the
  plain CE step of the same backbone."""
  check_comparable(config)
  torch, _ = load_torch()
  threads = benchmark_host.usable_cpus()
  torch.set_num_threads(threads)
  result = {"label": label, "machine": benchmark_host.device_info(), "threads": threads,
            "torch": torch.__version__, "jax": jax.__version__,
            "probe": benchmark_host.matmul_probe(2048, iterations=1),
            "config": {"model": config.model.name, "data": config.data.name,
                       "variant": config.objective.variant, "batch_size": config.batch_size}}
  steps = [config]
  if not skip_ce and config.model.mixskd:
    steps.append(recipes.with_method(config, "cross_entropy"))
  return result, steps


def step_name(config: ml_collections.ConfigDict) -> str:
  return "mixskd" if config.model.mixskd else "cross_entropy"


def machine_line(result: dict[str, Any]) -> str:
  """The printed line that names the machine, the versions, the load and the probe."""
  m = result["machine"]
  return (f"machine: {m['host_cpu']}, {m['host_cores']} cores, jax {result['jax']}, torch "
          f"{result['torch']}, load avg {m['load_average_1min']:.2f} -> "
          f"{m['load_average_1min_end']:.2f}; float32 matmul probe "
          f"{result['probe']['gflops']:.0f} GFLOP/s")


def compare_with_torch(config: ml_collections.ConfigDict, *, rounds: int = 3, steps: int = 5,
                       warmup: int = 2, skip_ce: bool = False, label: str = ""
                       ) -> dict[str, Any]:
  """The config's step and (unless `skip_ce`) the plain CE step of the same backbone, each
  against PyTorch (module docstring); the results as a dict for `format_comparison`."""
  result, configs = start_result(config, skip_ce=skip_ce, label=label)
  result.update(rounds=rounds, steps=steps, warmup=warmup, steps_compared={})
  for c in configs:
    result["steps_compared"][step_name(c)] = compare_step(
        c, rounds=rounds, steps=steps, warmup=warmup, probe_gflops=result["probe"]["gflops"])
  result["machine"]["load_average_1min_end"] = benchmark_host.device_info()["load_average_1min"]
  return result


def format_comparison(result: dict[str, Any]) -> str:
  """The comparison as a plain-text table."""
  c = result["config"]
  lines = [f"side by side {result.get('label') or ''}: {c['data']} / {c['model']} / "
           f"{c['variant']} / batch {c['batch_size']} clean (+{c['batch_size']} mixed for "
           f"MixSKD) / float32 / {result['threads']} threads / {result['rounds']} rounds x "
           f"{result['steps']} steps", machine_line(result), ""]
  header = (f"{'step':<15}{'side':<23}{'median s':>10}{'min s':>9}{'max s':>9}"
            f"{'torch/ours [min, max] over rounds':>36}{'peak GiB':>10}{'of probe':>10}")
  lines.append(header)
  for name, step in result["steps_compared"].items():
    for side_name, s in step["sides"].items():
      ratio = s.get("ratio_over_ours")
      ratio_text = (f"{ratio['median']:.2f}x [{ratio['min']:.2f}, {ratio['max']:.2f}]"
                    if ratio else "")
      peak = s.get("peak_bytes")
      frac = s.get("fraction_of_matmul_probe")
      label = "ours (JAX)" if side_name == "ours" else f"PyTorch {side_name}"
      lines.append(f"{name:<15}{label:<23}"
                   f"{s['median']:>10.3f}{s['min']:>9.3f}{s['max']:>9.3f}{ratio_text:>36}"
                   f"{'-' if peak is None else f'{peak / 2 ** 30:.2f}':>10}"
                   f"{'-' if frac is None else f'{frac:.0%}':>10}")
    loss = step["same_batch_loss"]
    lines.append(f"{'':<15}loss on one batch from the same weights: ours {loss['ours']:.6f}, "
                 f"PyTorch {loss['torch']:.6f} (relative difference "
                 f"{loss['relative_difference']:.1e})")
  return "\n".join(lines)


def report(make_result: Callable[[], dict[str, Any]],
           format_result: Callable[[dict[str, Any]], str], json_out: str | None) -> None:
  """Runs a comparison, prints its table and writes its JSON to `json_out`; no PyTorch, or a
  config it cannot compare, is one line on stderr and exit status 2."""
  try:
    result = make_result()
  except (TorchUnavailable, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_result(result))
  if json_out:
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as out:
      json.dump(result, out, indent=2, sort_keys=True)
    print(f"\nwrote {json_out}")


def main(flags: Any, *, label: str = "") -> None:
  """`python -m mixskd_jax.benchmark --against=torch`: `report` of `compare_with_torch`."""
  report(lambda: compare_with_torch(flags.config, rounds=flags.rounds, steps=flags.steps,
                                    warmup=flags.warmup, skip_ce=flags.skip_ce, label=label),
         format_comparison, flags.json_out)
