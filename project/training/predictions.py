"""`predict`'s output: one JSON line per prediction (prompt, completion, settings; or a classifier's text, label and
class probabilities)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)
completions_log = logging.getLogger("project.completions")  # the command line prints these to stdout


class PredictionWriter(BasePredictionWriter):
    """Write each completion as a JSON line (prompt, completion, settings), and log it for the console.

    Args:
        output_path: the JSONL file (an existing one is never overwritten); None writes predictions.jsonl (or
            predictions-2.jsonl, ..., the first name free) into the checkpoint's run folder, beside its
            checkpoints/ (or beside the checkpoint file when it is not in a run folder).
        print_to_stdout: also show each prompt and completion on the console (logger "project.completions").
    """

    def __init__(self, output_path: str | None = None, print_to_stdout: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path) if output_path else None
        self.print_to_stdout = print_to_stdout
        self.path: Path | None = None  # chosen when predicting starts
        self.written = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.output_path or free_name(run_folder_of(trainer.ckpt_path) / "predictions.jsonl")
        if trainer.is_global_zero and path.exists():
            raise FileExistsError(f"{path} exists; choose another --predictions.output_path or remove it")
        blocking = next((parent for parent in path.parents if parent.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise NotADirectoryError(f"--predictions.output_path {path}: {blocking} is a file, not a folder")
        self.path, self.written = path, 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if not trainer.is_global_zero:  # under tensor parallelism every rank holds the same outputs
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for record in prediction:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.written += len(prediction)
        if self.print_to_stdout:
            for record in prediction:
                if "completion" in record:
                    completions_log.info("%s%s\n%s", record["prompt"], record["completion"], "-" * 40)
                else:  # a classifier's: the label, its probability, the text
                    completions_log.info("%s (%.2f)\t%s", record["label"], record["probabilities"][record["label"]],
                                         record["text"].replace("\n", " / "))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("predict: wrote %d completion%s of %s to %s", self.written, "" if self.written == 1 else "s",
                     trainer.ckpt_path or "an untrained model", self.path)


def run_folder_of(ckpt_path: str | Path | None) -> Path:
    """The run folder of a checkpoint in `<run>/checkpoints/` (else the checkpoint's own folder; no checkpoint: .)."""
    if not ckpt_path:
        return Path(".")
    folder = Path(ckpt_path).parent
    return folder.parent if folder.name == "checkpoints" else folder


def free_name(path: Path) -> Path:
    """`path`, or the first of path-2, path-3, ... (before the suffix) that does not exist."""
    number = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        number += 1
    return candidate
