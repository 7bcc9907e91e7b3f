"""The recipes: multi-task fine-tuning (`multitask`), further pre-training (`pretrain`), and the encoder probes (`probe`)."""
