"""A disk-backed store of per-row `(T_i, H)` tensors, so that A-LoL's value head can make several passes over the
prompts' hidden states while a process holds only the batch it reads (`value_num_prompts` prompts of 1,000 tokens at
H = 4,096 in bf16 are 8 GB; in memory on every process, they were the largest cost of the precompute)."""

import os
import tempfile

import numpy as np
import torch


class FeatureStore:
    """Rows of hidden states written once, in any order, and read back by row id.

    Each tensor is appended to one file as raw bytes in its own dtype (bf16 stays bf16, so reads return exactly what
    was written); `store[row]` reads it back as a CPU tensor. `rows` lists the ids held. The file lives in a temporary
    folder (under `directory`, default the system's), removed by `close()` or on leaving a `with` block.
    """

    def __init__(self, directory: str | None = None):
        self._folder = tempfile.TemporaryDirectory(prefix="trl_offline_features_", dir=directory)
        self._path = os.path.join(self._folder.name, "features.bin")
        self._file = open(self._path, "wb")
        self._index: dict[
            int, tuple[int, int, tuple[int, ...], torch.dtype]
        ] = {}  # row -> (offset, bytes, shape, dtype)
        self._size = 0
        self._map = None

    def add(self, row: int, tensor: torch.Tensor) -> None:
        if self._map is not None:
            raise RuntimeError("The store is read-only once it has been read from.")
        data = tensor.detach().cpu().contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        self._file.write(raw)
        self._index[row] = (self._size, len(raw), tuple(data.shape), data.dtype)
        self._size += len(raw)

    @property
    def rows(self) -> list[int]:
        return list(self._index)

    def __contains__(self, row: int) -> bool:
        return row in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, row: int) -> torch.Tensor:
        if self._map is None:
            self._file.close()
            self._map = np.memmap(self._path, dtype=np.uint8, mode="r") if self._size else np.zeros(0, np.uint8)
        offset, size, shape, dtype = self._index[row]
        raw = torch.from_numpy(np.array(self._map[offset : offset + size]))  # a copy: the map stays read-only
        return raw.view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        return self._size

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._map = None
        self._folder.cleanup()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
