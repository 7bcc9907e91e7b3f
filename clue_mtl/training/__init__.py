"""What the recipes share: the parts their loops call (run folder, checkpoint, metrics), training by the clock, optimiser groups, the Accelerator, tracking, EMA, FGM, losses, distillation."""
