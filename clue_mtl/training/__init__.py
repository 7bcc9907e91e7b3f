"""What the recipes share: the step loop, training by the clock, optimiser groups, the Accelerator, tracking, EMA, FGM, losses, distillation."""
