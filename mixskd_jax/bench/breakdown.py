r"""Where each side's step spends its thread time, ours next to PyTorch's, row by row:

  python -m mixskd_jax.benchmark --config=configs/cifar100_resnet18_mixskd.py \
      --config.batch_size=64 --against=torch --profile [--steps=2 --warmup=1]

For the config's MixSKD step and the plain CE step of the same backbone: ours traced by JAX's
profiler and accounted thread-second by thread-second (`op_profile`, `thread_time`: each op's
own events plus the thread-pool work it scheduled, the runtime between ops, idle threads, time
outside compiled code), PyTorch's (NCHW and channels_last) by its profiler (`torch_profile`:
each op's self time x threads, time outside ops). Each side's rows sum to its traced steps'
wall time x threads, so the last column, ours less PyTorch NCHW per row, sums to the gap
between the two steps and says where it is.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mixskd_jax.bench import host as benchmark_host
from mixskd_jax.bench import op_profile, side_by_side, thread_time, torch_profile
from mixskd_jax.bench.torch_side import LAYOUTS, TorchSide

# Our kinds of XLA op (op_profile.KINDS) -> the rows both sides share.
OUR_ROWS = {"convolution": torch_profile.CONVOLUTION, "matmul": torch_profile.MATMUL,
            "elementwise fusion": torch_profile.ELEMENTWISE,
            "reduction": torch_profile.ELEMENTWISE, "transpose": torch_profile.LAYOUT,
            "copy": torch_profile.LAYOUT, op_profile.OTHER: torch_profile.OTHER,
            thread_time.RUNTIME: torch_profile.RUNTIME, thread_time.IDLE: torch_profile.IDLE,
            op_profile.OUTSIDE: torch_profile.OUTSIDE}


def our_rows(profile: dict[str, Any]) -> dict[str, float]:
  """`op_profile.profile_calls`'s result in the shared rows (seconds per step)."""
  rows = dict.fromkeys(torch_profile.SHARED_ROWS, 0.0)
  for row, s in op_profile.breakdown_rows(profile).items():
    rows[OUR_ROWS[row]] += s
  return rows


def profile_both(config: ml_collections.ConfigDict, *, steps: int = 2, warmup: int = 1,
                 skip_ce: bool = False, label: str = "") -> dict[str, Any]:
  """Both sides' breakdowns for the config's step and (unless `skip_ce`) the plain CE step."""
  result, configs = side_by_side.start_result(config, skip_ce=skip_ce, label=label)
  result.update(steps=steps, warmup=warmup, steps_profiled={})
  for c in configs:
    ours = op_profile.profile_step(c, steps=steps, warmup=warmup)
    sides = {"ours": {"rows": our_rows(ours), "capacity_s": ours["capacity_s"],
                      "wall_s": ours["wall_s"], "untraced_step_s": ours["step_s"],
                      "ops": dict(list(ours["ops"].items())[:40])}}
    side = TorchSide(c)
    for layout in LAYOUTS:
      side.set_layout(layout)
      theirs = torch_profile.profile_torch_side(side, steps=steps, warmup=warmup)
      theirs["untraced_step_s"] = min(side.time(steps=steps, warmup=0))
      theirs["ops"] = dict(list(theirs["ops"].items())[:40])
      sides[layout] = theirs
    result["steps_profiled"][side_by_side.step_name(c)] = sides
  result["machine"]["load_average_1min_end"] = benchmark_host.device_info()["load_average_1min"]
  return result


def format_breakdown(result: dict[str, Any]) -> str:
  """The breakdown as a plain-text table (ms of thread time per step)."""
  c = result["config"]
  lines = [f"thread time per step {result.get('label') or ''}: {c['data']} / {c['model']} / "
           f"{c['variant']} / batch {c['batch_size']} / float32 / {result['threads']} threads "
           f"/ {result['steps']} traced steps per side", side_by_side.machine_line(result),
           "ours: XLA ops with the thread-pool work they scheduled; PyTorch: each op's self time "
           "x threads. Rows sum to wall x threads."]
  columns = (f"{'ours':>10}" + "".join(f"{'PyTorch ' + k:>24}" for k in LAYOUTS)
             + f"{'ours - nchw':>14}")
  for name, sides in result["steps_profiled"].items():
    lines += ["", f"{name + ' step, ms':<38}{columns}"]
    for row in torch_profile.SHARED_ROWS:
      values = [sides[k]["rows"][row] * 1e3 for k in ("ours",) + LAYOUTS]
      lines.append(f"  {row:<36}{values[0]:>10.1f}"
                   + "".join(f"{v:>24.1f}" for v in values[1:])
                   + f"{values[0] - values[1]:>+14.1f}")
    totals = [sides[k]["capacity_s"] * 1e3 for k in ("ours",) + LAYOUTS]
    lines.append(f"  {'total: wall x threads':<36}{totals[0]:>10.1f}"
                 + "".join(f"{v:>24.1f}" for v in totals[1:]) + f"{totals[0] - totals[1]:>+14.1f}")
    untraced = [sides[k]["untraced_step_s"] * 1e3 for k in ("ours",) + LAYOUTS]
    lines.append(f"  {'untraced step (wall, best of steps)':<36}{untraced[0]:>10.1f}"
                 + "".join(f"{v:>24.1f}" for v in untraced[1:])
                 + f"{untraced[0] - untraced[1]:>+14.1f}")
  return "\n".join(lines)


def main(flags: Any, *, label: str = "") -> None:
  """`benchmark --against=torch --profile`: `side_by_side.report` of `profile_both`."""
  side_by_side.report(lambda: profile_both(flags.config, steps=max(flags.steps, 1),
                                           warmup=flags.warmup, skip_ce=flags.skip_ce,
                                           label=label),
                      format_breakdown, flags.json_out)
