"""Fine-tuning sets made from TinyShakespeare itself, offline: who speaks these lines, and continue this speech.

    python -m project finetune-data --out data/finetune

The corpus is a sequence of speeches, `NAME:\\n` and the speech's lines, separated by blank lines. It writes:

    speakers/{train,val,test}.csv     text,label: a speech and who speaks it, for the `speakers` most frequent
                                      speakers (a classification set)
    instruct/{train,val,test}.jsonl   Alpaca records (instruction, input, output): "Which character speaks these
                                      lines?" (the same speeches and splits as speakers/), and "Continue this speech
                                      by NAME." (its first line as input, the next one or two as output)
    pretrain.txt                      the corpus without the validation and test speeches of either set (every
                                      copy of them), so a model pretrained on it has never read what it is
                                      evaluated on
    meta.json                         the source's SHA-256, the settings, the speakers, the counts

Splits are fixed and reproducible (the same files, byte for byte, on every run): a speech's split is decided by the
SHA-256 of its position in the corpus. The `speakers` speeches are split per speaker (10% test, 10% validation, the
rest training, so every speaker is in every split); every other speech falls in test or validation with a 10%
chance each. Both sets use the same split of each speech, so no speech is in two splits. Speeches longer than
`max_chars` characters are left out (most of them would not fit a small model's context).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from project.data.corpus import SHAKESPEARE_SHA256, download_shakespeare, read_corpus, sha256_of
from project.files import atomic_path

SPLITS = ("train", "val", "test")
HELD_OUT_SHARE = 0.1  # of each speaker's speeches for test, and as much for validation
WHO_SPEAKS = "Which character speaks these lines?"


@dataclass(frozen=True)
class Speech:
    """One speech of the corpus: its position among the blocks, speaker and lines."""

    block: int
    speaker: str
    text: str


def blocks_of(text: str) -> list[str]:
    return text.split("\n\n")


def speeches_of(blocks: list[str]) -> list[Speech]:
    """The speeches (`NAME:` then at least one line) among the corpus's blocks, each text once (a repeated one,
    "My lord?", is kept where it first occurs, so it cannot be in two splits); the other blocks are skipped."""
    speeches, seen = [], set()
    for index, block in enumerate(blocks):
        head, _, body = block.strip("\n").partition("\n")
        if head.endswith(":") and len(head) > 1 and body.strip() and body not in seen:
            speeches.append(Speech(index, head[:-1], body))
            seen.add(body)
    return speeches


def rank(speech: Speech) -> str:
    """A speech's fixed pseudo-random rank: the SHA-256 of its position."""
    return hashlib.sha256(str(speech.block).encode()).hexdigest()


def assign_splits(speeches: list[Speech], speakers: list[str]) -> dict[int, str]:
    """Block index -> split: per speaker for `speakers` (stratified), by rank for everyone else."""
    split = {}
    for name in speakers:
        own = sorted((s for s in speeches if s.speaker == name), key=rank)
        held = max(1, round(HELD_OUT_SHARE * len(own)))
        for i, speech in enumerate(own):
            split[speech.block] = "test" if i < held else "val" if i < 2 * held else "train"
    for speech in speeches:
        if speech.block not in split:
            bucket = int(rank(speech), 16) % 10
            split[speech.block] = "test" if bucket == 0 else "val" if bucket == 1 else "train"
    return split


def continue_record(speech: Speech) -> dict | None:
    """"Continue this speech by NAME.": its first line in, the next one or two out (None for a one-line speech)."""
    lines = speech.text.split("\n")
    if len(lines) < 2:
        return None
    return {"instruction": f"Continue this speech by {speech.speaker}.", "input": lines[0],
            "output": "\n".join(lines[1:3])}


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["text", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build_finetune_data(*, out: str, path: str | None = None, data_dir: str = "data", speakers: int = 8,
                        max_chars: int = 400) -> dict:
    """Build the speaker-classification and instruction sets from TinyShakespeare (see project/data/shakespeare_tasks.py).

    Args:
        out: the folder to create (speakers/, instruct/, pretrain.txt, meta.json); it must not exist.
        path: the corpus; default TinyShakespeare at <data_dir>/tinyshakespeare/input.txt (downloaded once).
        data_dir: where TinyShakespeare is looked for when `path` is not given.
        speakers: how many of the most frequent speakers the classification set has (2 or more).
        max_chars: speeches longer than this many characters are left out.
    """
    if speakers < 2:
        raise ValueError(f"--speakers must be >= 2 (a classifier needs two classes), got {speakers}")
    if max_chars < 1:
        raise ValueError(f"--max_chars must be >= 1, got {max_chars}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists: choose another --out or remove it")
    source = Path(path) if path else Path(data_dir) / "tinyshakespeare" / "input.txt"
    if path is None and not source.exists():
        download_shakespeare(source)
    elif path is None and sha256_of(source) != SHAKESPEARE_SHA256:
        raise ValueError(f"{source} is not the expected TinyShakespeare (SHA-256 mismatch): delete it to re-download")
    elif not source.is_file():
        raise FileNotFoundError(f"corpus file {source} does not exist: pass --path pointing to a UTF-8 text file")
    blocks = blocks_of(read_corpus(source))
    speeches = [s for s in speeches_of(blocks) if len(s.text) <= max_chars]
    top = [name for name, _ in sorted(Counter(s.speaker for s in speeches).items(), key=lambda kv: (-kv[1], kv[0]))]
    top = top[:speakers]
    if len(top) < speakers:
        raise ValueError(f"{source} has {len(top)} speakers with speeches of at most {max_chars} characters, fewer "
                         f"than --speakers {speakers}: is it a play in TinyShakespeare's shape (NAME:, then lines)?")
    split = assign_splits(speeches, top)
    classify = {name: [] for name in SPLITS}
    instruct = {name: [] for name in SPLITS}
    for speech in speeches:  # corpus order within each split
        part = split[speech.block]
        if speech.speaker in top:
            classify[part].append({"text": speech.text, "label": speech.speaker})
            instruct[part].append({"instruction": WHO_SPEAKS, "input": speech.text, "output": speech.speaker})
        if (record := continue_record(speech)) is not None:
            instruct[part].append(record)
    held_out = {s.text for s in speeches if split[s.block] != "train"}
    kept = [block for block in blocks if block.strip("\n").partition("\n")[2] not in held_out]  # every copy out
    meta = {
        "source": {"path": source.name, "sha256": sha256_of(source)},
        "settings": {"speakers": speakers, "max_chars": max_chars, "held_out_share": HELD_OUT_SHARE},
        "speakers": top,
        "counts": {"speakers": {k: len(v) for k, v in classify.items()},
                   "instruct": {k: len(v) for k, v in instruct.items()},
                   "pretrain.txt": {"blocks": len(kept), "held_out_speeches": len(held_out)}},
        "split_rule": "per speech: sha256(block index); speakers' speeches stratified per speaker, others by rank mod 10",
    }
    with atomic_path(target, folder=True) as staging:
        for name in SPLITS:
            (staging / "speakers").mkdir(exist_ok=True)
            (staging / "instruct").mkdir(exist_ok=True)
            (staging / "speakers" / f"{name}.csv").write_text(csv_text(classify[name]), encoding="utf-8")
            (staging / "instruct" / f"{name}.jsonl").write_text(jsonl_text(instruct[name]), encoding="utf-8")
        (staging / "pretrain.txt").write_text("\n\n".join(kept), encoding="utf-8")
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta
