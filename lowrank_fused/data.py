"""Training data for ``lowrank_fused.train``.

Two sources:

* the default corpus: the ``.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), read at run time, so every machine has it and no text
  is committed. Paths are sorted, shuffled with a seeded ``random.Random`` and taken until a
  byte cap; tokens are raw bytes (vocab 256). The content differs between Python versions,
  the procedure does not.
* a nanoGPT-style flat ``.bin`` file of uint16 token ids, memory-mapped with ``np.memmap``
  (``load_bin``). A ``train.bin`` with a sibling ``val.bin`` uses that as validation split;
  otherwise the tail of the file is held out.
* the user's own text (``load_text``): one or more files or folders, read as raw bytes
  (vocab 256), the tail held out for validation.

``BatchSampler`` draws random windows (x, y = next tokens) with its own ``torch.Generator``,
so a seed fixes the batch sequence independent of the global RNG.
"""
from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

BYTE_VOCAB = 256
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}

Tokens = Union[torch.Tensor, np.ndarray]


@dataclass
class Corpus:
    """Train/val token streams plus where they came from."""

    train: Tokens
    val: Tokens
    vocab_size: int
    source: str
    num_files: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.train) + len(self.val)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_py_files(root: Optional[Union[str, Path]] = None) -> List[Path]:
    """All ``.py`` files under the stdlib directory (recursively, without third-party
    ``site-packages``), sorted by their path relative to ``root``."""
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def select_files(files: Sequence[Path], max_bytes: int, seed: int) -> List[Path]:
    """A seeded shuffle of ``files`` (given in sorted order), taken while the total size stays
    within ``max_bytes`` (files that would overflow are skipped, smaller ones may still fit)."""
    order = list(files)
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for path in order:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size == 0 or total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    return chosen


def split_tokens(tokens: Tokens, val_fraction: float) -> Tuple[Tokens, Tokens]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def load_stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0,
                       val_fraction: float = 0.1,
                       root: Optional[Union[str, Path]] = None) -> Corpus:
    """Byte-level corpus from the standard library's ``.py`` files.

    The selected files are concatenated in selection order (separated by a newline); the last
    ``val_fraction`` of the bytes is the validation split. Tokens are an int64 tensor.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    files = stdlib_py_files(root)
    chosen = select_files(files, max_bytes, seed)
    chunks = []
    for path in chosen:
        try:
            chunks.append(path.read_bytes())
        except OSError:
            continue
    data = b"\n".join(c for c in chunks if c)
    where = root if root is not None else stdlib_dir()
    if len(data) < 2:
        raise RuntimeError(
            f"the standard-library corpus is empty: no readable .py files under {where} "
            f"(found {len(files)} .py files, max_bytes={max_bytes}); pass --data PATH.bin instead")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    train, val = split_tokens(tokens, val_fraction)
    return Corpus(train, val, BYTE_VOCAB, f"stdlib .py files under {where}", len(chunks))


def load_bin(path: Union[str, Path], vocab_size: Optional[int] = None,
             val_fraction: float = 0.1, dtype=np.uint16) -> Corpus:
    """A flat binary file of token ids (nanoGPT's ``train.bin``: uint16), memory-mapped.

    If ``path`` is named ``train.bin`` and a ``val.bin`` sits next to it, that is the
    validation split; otherwise the last ``val_fraction`` of the tokens is held out.
    ``vocab_size`` defaults to the largest id + 1; ids at or above a given ``vocab_size``
    raise ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data file not found: {path}")
    itemsize = np.dtype(dtype).itemsize
    if path.stat().st_size < 2 * itemsize:
        raise ValueError(f"--data file {path} holds fewer than 2 tokens of {np.dtype(dtype).name}")
    if path.stat().st_size % itemsize:
        raise ValueError(f"--data file {path} has a size that is not a multiple of "
                         f"{itemsize} bytes; expected a flat array of {np.dtype(dtype).name}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    val_path = path.with_name("val.bin")
    if path.name == "train.bin" and val_path.is_file() and val_path.stat().st_size >= 2 * itemsize:
        train, val = tokens, np.memmap(val_path, dtype=dtype, mode="r")
    else:
        train, val = split_tokens(tokens, val_fraction)
    max_id = max(int(train.max()), int(val.max()))
    if vocab_size is None:
        vocab_size = max_id + 1
    elif max_id >= vocab_size:
        raise ValueError(f"--data {path} contains token id {max_id} >= --vocab-size {vocab_size}")
    return Corpus(train, val, int(vocab_size), f"token file {path}")


def text_files(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """The files named by ``paths``: a file as given, a folder as every regular file under it
    (recursively, sorted, hidden entries skipped). Raises ``FileNotFoundError``."""
    out: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
        else:
            raise FileNotFoundError(f"--data path not found: {path}")
    return out


def load_text(paths: Union[str, Path, Sequence[Union[str, Path]]], val_fraction: float = 0.1,
              max_bytes: Optional[int] = None) -> Corpus:
    """Byte-level corpus (vocab 256) from text files or folders, concatenated in the given
    order (folders: sorted) with a newline between files; the last ``val_fraction`` of the
    bytes is the validation split. ``max_bytes`` caps the bytes read."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = text_files(paths)
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        if max_bytes is not None:
            data = data[: max(0, max_bytes - total)]
        if data:
            chunks.append(data)
            total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"\n".join(chunks)
    if len(data) < 2:
        raise ValueError(f"--data {', '.join(map(str, paths))}: fewer than 2 bytes of text")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    train, val = split_tokens(tokens, val_fraction)
    where = ", ".join(map(str, paths))
    return Corpus(train, val, BYTE_VOCAB, f"text {where} (bytes)", len(chunks))


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens: ``x = w[:-1]``, ``y = w[1:]`` (int64).

    ``tokens`` is a 1-D int tensor or numpy array (a memmap is read window by window).
    Deterministic for a given ``seed``: the start offsets come from a private
    ``torch.Generator``.
    """

    def __init__(self, tokens: Tokens, batch_size: int, seq_len: int, seed: int = 0,
                 device: Union[str, torch.device] = "cpu"):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the token stream has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        """The generator's state: restoring it continues the exact batch sequence."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        hi = len(self.tokens) - self.seq_len  # exclusive bound of window starts
        starts = torch.randint(0, hi, (self.batch_size,), generator=self.generator)
        if isinstance(self.tokens, torch.Tensor):
            idx = starts[:, None] + torch.arange(self.seq_len + 1)
            w = self.tokens[idx].to(torch.int64)
        else:
            w = torch.from_numpy(np.stack(
                [np.asarray(self.tokens[s: s + self.seq_len + 1], dtype=np.int64)
                 for s in starts.tolist()]))
        x, y = w[:, :-1], w[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)
