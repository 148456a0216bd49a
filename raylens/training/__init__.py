"""Fine-tuning InternVL2 models on Ray Train (`python -m jobs.finetune`), and the demo model's training.

records -> samples (the inference encoding, with labels) -> loader (each rank's micro-batches, off the step's
critical path) -> loop (the TorchTrainer worker: LoRA or full, DDP or FSDP2, checkpoints, resume) ->
checkpoint (the self-describing run directory) -> lora.merge_trained (jobs.merge). docs/design.md has the
picture; this package imports no Ray at module level, so its pure parts are tested without it.
"""
