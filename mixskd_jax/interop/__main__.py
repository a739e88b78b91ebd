"""Convert an official MixSKD PyTorch checkpoint (or an .npz state dict) to a Flax/Orbax one.

  python -m mixskd_jax.interop --checkpoint resnet18.pth.tar --model cifar_resnet18 \
      --num_classes 100 --output /tmp/mixskd_r18 [--backbone_only]

The output directory holds `variables/` (Orbax) and `model.json`; load it with
`mixskd_jax.interop.load_converted(output)`. Refused inputs (a --num_classes below 1, weights
that are NaN or infinite) write nothing and end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

import jax

from mixskd_jax.interop.checkpoint_io import read_state_dict, save_converted
from mixskd_jax.interop.convert import ConversionRefused, convert_state_dict, export_backbone
from mixskd_jax.models.registry import RESNETS, build_model


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m mixskd_jax.interop", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help=".pth/.pth.tar/.pt or .npz file")
  parser.add_argument("--model", required=True, choices=sorted(RESNETS))
  parser.add_argument("--num_classes", required=True, type=int)
  parser.add_argument("--output", required=True, help="new directory to write")
  parser.add_argument("--plain", action="store_true",
                      help="the file is a plain backbone (torchvision key layout), not MixSKD")
  parser.add_argument("--backbone_only", action="store_true",
                      help="keep only the backbone (inference/transfer model)")
  parser.add_argument("--discriminator_seed", type=int, default=0,
                      help="seed of the random discriminators that official files lack")
  return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
  """Refuses arguments that would fail later (num_classes 0: a ZeroDivisionError in the model's
  initializer), before the checkpoint is read."""
  if args.num_classes < 1:
    raise ConversionRefused(f"--num_classes {args.num_classes}: must be >= 1, the number of "
                            "classes the checkpoint's classifiers output (100 for CIFAR-100).")


def main(argv: list[str] | None = None) -> str:
  """Converts as the command line says; returns the directory written.

  Raises:
    ConversionRefused: bad arguments or non-finite weights; nothing is written.
  """
  args = parse_args(sys.argv[1:] if argv is None else argv)
  check_args(args)
  mixskd = not args.plain
  model = build_model(args.model, args.num_classes, mixskd=mixskd)
  variables = convert_state_dict(read_state_dict(args.checkpoint), model,
                                 discriminator_key=jax.random.key(args.discriminator_seed))
  if args.backbone_only and mixskd:
    variables, mixskd = export_backbone(variables), False
  out = save_converted(args.output, variables, model_name=args.model,
                       num_classes=args.num_classes, mixskd=mixskd, source=args.checkpoint)
  print(f"Wrote {'MixSKD' if mixskd else 'backbone'} {args.model} ({args.num_classes} classes) "
        f"to {out}")
  return out


def run() -> int:
  """The command: `main`, with a refusal as one line on stderr and exit status 2."""
  try:
    main()
  except ConversionRefused as e:
    print(e, file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(run())
