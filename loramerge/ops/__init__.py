"""Pure math on LoRA factors and adapters: tensors and numbers in, tensors and numbers out."""
