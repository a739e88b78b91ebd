"""Import official PyTorch (Self-KD-Lib) MixSKD checkpoints; export backbones to PyTorch."""

from mixskd_jax.interop.checkpoint_io import load_converted, read_state_dict, save_converted
from mixskd_jax.interop.convert import convert_state_dict, export_backbone
from mixskd_jax.interop.export import ExportRefused, save_pt, save_safetensors, torch_state_dict

__all__ = ["ExportRefused", "convert_state_dict", "export_backbone", "load_converted",
           "read_state_dict", "save_converted", "save_pt", "save_safetensors",
           "torch_state_dict"]
