"""Fine-tune adapters (LoRA / QLoRA), attach or merge them."""
