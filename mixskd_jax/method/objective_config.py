"""`ObjectiveConfig`: which MixSKD objective to compute, as one frozen, hashable value.

The variant (described in `mixskd_jax.method.objective`) decides every term's default weight
(`ObjectiveConfig.for_variant`) and which heads train (`trains_self_teacher`,
`trains_discriminators`); on top of it come the KD temperature, per-term weight overrides,
the reversed gradient's scale and the research options (`kl_gate`, `discriminator_input`).
Every field is checked when the config is built, with an error naming the allowed values.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from mixskd_jax.config.choices import DISCRIMINATOR_INPUTS, KL_GATES, TERMS, VARIANTS


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Which MixSKD objective to compute. Build it with `ObjectiveConfig.for_variant`.

  Attributes:
    variant: one of VARIANTS; decides the default weights and what is trainable.
    temperature: KD temperature T (3 in both official scripts).
    weights: weight of every term in TERMS (all 1 in the reference, except the terms a
      variant leaves out, which are 0 and still logged).
    gradient_reversal_scale: factor on the reversed gradient that reaches the network from
      the discriminators (`adversarial` only).
    kl_gate: one of KL_GATES (research option; "none" is the reference). With
      "teacher_leads", `kl_self_teacher` enters the loss only on steps where the self-teacher
      is more accurate than the backbone head on the rows that term pairs (`kl_schedule.kl_gate_accuracies`);
      "monitor" only logs that gate. Both log `kl_gate_open` (1/0) and the two accuracies.
    discriminator_input: one of DISCRIMINATOR_INPUTS ("pooled" is the reference).
  """
  variant: str = "full"
  temperature: float = 3.0
  weights: tuple[tuple[str, float], ...] = tuple((t, 1.0) for t in TERMS)
  gradient_reversal_scale: float = 1.0
  kl_gate: str = "none"
  discriminator_input: str = "pooled"

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"objective variant={self.variant!r} is unknown; use one of {VARIANTS}.")
    if not self.temperature > 0:  # also refuses NaN
      raise ValueError(f"objective temperature={self.temperature} must be > 0.")
    names = [n for n, _ in self.weights]
    if sorted(names) != sorted(TERMS):
      raise ValueError(f"objective weights must name each of {TERMS} once; got {names}.")
    if self.kl_gate not in KL_GATES:
      raise ValueError(f"objective kl_gate={self.kl_gate!r} is unknown; use one of {KL_GATES}.")
    if self.discriminator_input not in DISCRIMINATOR_INPUTS:
      raise ValueError(f"objective discriminator_input={self.discriminator_input!r} is "
                       f"unknown; use one of {DISCRIMINATOR_INPUTS}.")

  @classmethod
  def for_variant(cls, variant: str = "full", *, temperature: float = 3.0,
                  weights: Mapping[str, float] | None = None,
                  gradient_reversal_scale: float = 1.0,
                  kl_gate: str = "none",
                  discriminator_input: str = "pooled") -> "ObjectiveConfig":
    """The variant's reference weights, with any of them overridden by `weights`."""
    defaults = {t: 1.0 for t in TERMS}
    if variant == "reference_cifar":
      defaults.update(mixup_ce=0.0, self_teacher_ce=0.0)
    unknown = set(weights or {}) - set(TERMS)
    if unknown:
      raise ValueError(f"Unknown objective weight(s) {sorted(unknown)}; terms are {TERMS}.")
    defaults.update(weights or {})
    return cls(variant=variant, temperature=float(temperature),
               weights=tuple((t, float(defaults[t])) for t in TERMS),
               gradient_reversal_scale=float(gradient_reversal_scale), kl_gate=kl_gate,
               discriminator_input=discriminator_input)

  def weight(self, term: str) -> float:
    return dict(self.weights)[term]

  @property
  def trains_self_teacher(self) -> bool:
    return self.variant != "reference_cifar"

  @property
  def trains_discriminators(self) -> bool:
    return self.variant == "adversarial"
