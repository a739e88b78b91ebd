"""Convert an official MixSKD PyTorch checkpoint (or an .npz state dict) to a Flax/Orbax one.

  python -m mixskd_jax.interop --checkpoint resnet18.pth.tar --model cifar_resnet18 \
      --num_classes 100 --output /tmp/mixskd_r18 [--backbone_only]

The output directory holds `variables/` (Orbax) and `model.json`; load it with
`mixskd_jax.interop.load_converted(output)`.
"""

from __future__ import annotations

import argparse
import sys

import jax

from mixskd_jax.interop.checkpoint_io import read_state_dict, save_converted
from mixskd_jax.interop.convert import convert_state_dict, export_backbone
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


def main(argv: list[str] | None = None) -> str:
  args = parse_args(sys.argv[1:] if argv is None else argv)
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


if __name__ == "__main__":
  main()
