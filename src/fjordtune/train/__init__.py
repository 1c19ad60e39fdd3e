"""Training: LoRA, FSDP2 sharding, the Ray-free step core, and the Ray Train driver."""
