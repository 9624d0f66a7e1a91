"""What every training recipe shares (SFT, the DPO family, the reward model, GRPO/RLOO/PPO, RFT).

- `config.TrainingConfig`: the shared settings (lr, schedule, batching, precision, checkpoints, ...)
- `setup.setup_accelerator`, `setup.seed_everything`: one process, DDP or FSDP; seeds
- `precision.Precision`: bf16 compute with fp32 trainable weights (or plain fp32), `autocast()`, `cast_model()`
- `batching`: `encode_conversation`, `LengthGroupedBatches`, `collate`, `Batch`, `TokenSequence`
- `logprobs`: `token_logprobs`, `sequence_logprobs`, `sft_loss` (LM head at target positions only), `LossOutput`
- `optim`: `build_optimizer` (AdamW), `build_schedule` (warmup + cosine/linear/constant)
- `step.TrainStep`: accumulation, clipping and the non-finite check of one optimizer step
- `monitor.TrainingMonitor`: metrics.jsonl, progress bar, tokens/s, peak memory
- `checkpoint.Checkpointer`: atomic checkpoints with RNG and optimizer state; exact resume
- `loop.TrainingTail`: what follows every optimizer step of every recipe (budget, log, evaluate, keep the best,
  early stop, checkpoint, non-finite loss) and the best weights back at the end; `LoopState`, `Best`
- `run_folder`: `open_run` (create or reopen a run folder; refuse to resume with other settings), `every`
- `memory`: `estimate_training_memory`, `fit_memory` / `fit_micro_batch` (a micro-batch or checkpointing that fits,
  said in one line; a refusal naming what to change only when nothing fits)
- `validation`: `score_sequences`, `greedy_answers` (scoring on the in-memory model during training)
"""
