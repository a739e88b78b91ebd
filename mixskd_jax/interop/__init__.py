"""Import official PyTorch (Self-KD-Lib) MixSKD checkpoints; export the bare backbone."""

from mixskd_jax.interop.checkpoint_io import load_converted, read_state_dict, save_converted
from mixskd_jax.interop.convert import convert_state_dict, export_backbone

__all__ = ["convert_state_dict", "export_backbone", "load_converted", "read_state_dict",
           "save_converted"]
