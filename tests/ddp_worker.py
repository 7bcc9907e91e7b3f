"""Run by the tests under torch.distributed.run, or as forks of the test process (tests/forked.py
`run_ranks`): train a few steps per config and record a weight checksum
(`ddp_worker.py CONFIG [CONFIG ...] OUT_DIR`: runs in OUT_DIR/run, or run0, run1, ...)."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from clue_mtl.config import load_config
from clue_mtl.recipes.multitask import Trainer


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(config_paths: list[str], out_dir: str) -> None:
    # a fork of a test process (tests/forked.py run_ranks) inherits its single-process Accelerate state
    AcceleratorState._reset_state(reset_partial_state=True)
    for number, config_path in enumerate(config_paths):
        suffix = "" if len(config_paths) == 1 else str(number)
        trainer = Trainer(load_config(config_path), Path(out_dir) / f"run{suffix}", show_progress=False)
        initial = checksum(trainer.unwrapped)
        trainer.train()
        record = {"world_size": trainer.accelerator.num_processes, "initial_checksum": initial,
                  "checksum": checksum(trainer.unwrapped), "task_weights": trainer.weighting.task_weights(),
                  "steps": trainer.state.step}
        rank = trainer.accelerator.process_index
        (Path(out_dir) / f"rank{rank}{'-' + suffix if suffix else ''}.json").write_text(json.dumps(record))
        del trainer


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
