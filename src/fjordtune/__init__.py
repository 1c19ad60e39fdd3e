"""fjordtune: LoRA fine-tuning of large MoE models on Ray with FSDP2, and full NorEval evaluation."""

__version__ = "0.1.0"
