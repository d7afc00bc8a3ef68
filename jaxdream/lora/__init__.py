"""LoRA files (diffusers/peft and kohya/A1111 layouts), merging them into models and attaching them as adapters."""

from jaxdream.lora.files import FORMATS, LoRAModule, LoRAWeights, load_lora, lora_tensors, save_lora
from jaxdream.lora.merge import apply_lora, check_lora, merge_lora, merge_lora_components

__all__ = [
  'FORMATS',
  'LoRAModule',
  'LoRAWeights',
  'apply_lora',
  'check_lora',
  'load_lora',
  'lora_tensors',
  'merge_lora',
  'merge_lora_components',
  'save_lora',
]
