"""Recovery training of compressed models: distillation from the dense model, or the LM loss; all weights or LoRA."""
