"""The training engine both trainers compose (`vqgan.train`, `vqgan.train_prior`).

- `state.TrainState`: the counters a checkpoint keeps (step, data position, skip counts).
- `batches.resumable_batches`: batches forever from a saved (epoch, offset), across epochs.
- `rng.seed_window`: every window's randomness from (seed, data position, rank), so nothing done
  between windows (an export, an evaluation, a resume) can change what the run does next.
- `window`: micro-batch flags fused into one all-reduce, the non-finite policy, the optimizer update
  (one GradScaler for two optimizers), and the snapshot that lets a discarded window leave no trace.
- `checkpoint`: atomic multi-process save, newest-complete resume, pruning, config drift.
- `ema`: the EMA of the weights with warm-up.
- `gan_step`: the tokenizer's generator and discriminator steps, the functions the loop, the tests
  and `benchmarks/train_step.py` all call.
- `run`: the Accelerator, the run folder, the shared-filesystem check, cadence.
"""
