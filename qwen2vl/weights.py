"""Finding a checkpoint (local directory or hub id) and loading its safetensors strictly into a model.

Tensor names are the checkpoints' own. transformers 5.x runtime names (`model.language_model.*`,
`model.visual.*`) are mapped back to them. Loading is strict: a missing, unexpected or mis-shaped tensor is a
CheckpointError that names it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from .errors import CheckpointError

# transformers 5.x names -> the hub's names (the inverse of transformers' conversion_mapping for qwen2_vl).
_NAME_MAP = [(re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual.")]

# What a checkpoint download needs (no weights of other formats, no README images).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


def canonical_name(name: str) -> str:
    for pattern, repl in _NAME_MAP:
        name, n = pattern.subn(repl, name)
        if n:
            break
    return name


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id downloaded (or found in the cache) with huggingface_hub.

    The download shows huggingface_hub's progress bars (HF_HUB_DISABLE_PROGRESS_BARS=1 hides them).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name!r} is not a checkpoint directory (and not a hub id like "
                              "'Qwen/Qwen2-VL-2B-Instruct')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"the hub has no model {name!r} (or it is gated and you are not logged in)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {name!r} from the Hugging Face hub and it is not in the local cache "
            f"({type(e).__name__}: {e}). If this machine is offline, download it elsewhere with "
            f"`hf download {name}` (huggingface_hub's CLI) and copy the cache (~/.cache/huggingface/hub, or "
            f"$HF_HOME), or pass the path of a local checkpoint directory instead. If you are online, check your "
            "network and HF_TOKEN."
        ) from None


class _NoBar:  # a do-nothing progress bar
    def __init__(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *a): pass
    def update(self, *a): pass
    def close(self): pass


def safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (ckpt / s).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {ckpt}: {missing}")
        return [ckpt / s for s in shards]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {ckpt}")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, str]]:
    """(canonical name, open file, name in file) for every tensor, without reading any data."""
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                yield canonical_name(key), f, key


def _header(f: Path) -> tuple[int, dict]:
    """A safetensors file's data start and tensor entries: an 8-byte little-endian length, then JSON with each
    tensor's dtype, shape and data_offsets from the header's end."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


class RowReader:
    """A 2-D tensor of a safetensors file (an embedding table) whose rows are read on demand with pread, into fresh
    memory. Not memory-mapped: a mapping's fault-around keeps ~64 KB around every row read resident, which grew the
    2B model's RSS by ~0.4 GB over one 1024-token prompt. `reader[ids]` is `table[ids]`; `reader[a:b]` a block.
    `gather` (kernels.Kernels.read_rows, where the plan has native kernels) reads a batch of rows in one call instead
    of a pread per row from Python."""

    _DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], dtype: torch.dtype, gather=None):
        self.path, self.offset, self.shape, self.dtype, self.gather = path, offset, shape, dtype, gather
        self.row_bytes = shape[1] * dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    @classmethod
    def open(cls, ckpt: Path, names: tuple[str, ...], gather=None) -> "RowReader":
        """The first of `names` (canonical) in the checkpoint."""
        found = {name: (f, key) for name, f, key in iter_tensors(safetensors_files(ckpt))}
        name = next((n for n in names if n in found), None)
        if name is None:
            raise CheckpointError(f"none of {list(names)} is in {ckpt}")
        f, key = found[name]
        return cls._at(name, f, key, _header(f), gather)

    @classmethod
    def open_each(cls, ckpt: Path, names: list[str]) -> list["RowReader"]:
        """A reader for each of `names` (canonical), each file's header read once."""
        found = {name: (f, key) for name, f, key in iter_tensors(safetensors_files(ckpt))}
        missing = [n for n in names if n not in found]
        if missing:
            raise CheckpointError(f"{ckpt} has no {_few(missing)}")
        headers = {f: _header(f) for f in {found[n][0] for n in names}}
        return [cls._at(n, *found[n], headers[found[n][0]]) for n in names]

    @classmethod
    def _at(cls, name: str, f: Path, key: str, header: tuple[int, dict], gather=None) -> "RowReader":
        data_start, tensors = header
        meta = tensors[key]
        if meta["dtype"] not in cls._DTYPES or len(meta["shape"]) != 2:
            raise CheckpointError(f"{name} in {f.name}: expected a 2-D float tensor, got {meta['dtype']} "
                                  f"{meta['shape']}")
        return cls(f, data_start + meta["data_offsets"][0], tuple(meta["shape"]), cls._DTYPES[meta["dtype"]], gather)

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(idx, slice):
            r0, r1, step = idx.indices(self.shape[0])
            assert step == 1
            return self.read_into(torch.empty(max(r1 - r0, 0), self.shape[1], dtype=self.dtype), r0)
        rows = idx.reshape(-1)
        bad = (rows < 0) | (rows >= self.shape[0])
        if bad.any():
            raise IndexError(f"row {int(rows[bad][0])} out of range for {self.shape[0]} rows")
        out = torch.empty(len(rows), self.shape[1], dtype=self.dtype)
        if self.gather is not None:
            try:
                self.gather(self.fd, self.offset, self.row_bytes, rows, out.view(torch.uint8))
            except OSError as e:
                raise CheckpointError(f"{self.path}: {e} (truncated file?)") from None
            return out.view(*idx.shape, self.shape[1])
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        for i, r in enumerate(rows.tolist()):
            self._read(buf[i * self.row_bytes:(i + 1) * self.row_bytes], self.offset + r * self.row_bytes)
        return out.view(*idx.shape, self.shape[1])

    def read_into(self, out: torch.Tensor, first: int = 0) -> torch.Tensor:
        """`out` (contiguous, this table's dtype, whole rows) = the rows from `first` on: no allocation."""
        assert out.dtype == self.dtype and out.is_contiguous() and out.numel() % self.shape[1] == 0
        assert first + out.numel() // self.shape[1] <= self.shape[0]
        self._read(memoryview(out.view(torch.uint8).numpy()).cast("B"), self.offset + first * self.row_bytes)
        return out

    def _read(self, buf: memoryview, offset: int) -> None:
        while len(buf):  # pread may return fewer bytes than asked
            n = os.preadv(self.fd, [buf], offset)
            if n <= 0:
                raise CheckpointError(f"{self.path} ended early (truncated file?)")
            buf, offset = buf[n:], offset + n

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def tensor_names(ckpt: Path) -> set[str]:
    """Canonical names of every tensor in the checkpoint (reads headers only)."""
    return {name for name, _, _ in iter_tensors(safetensors_files(ckpt))}


def load_weights(model: nn.Module, ckpt: Path, *, device: torch.device | str,
                 tied: tuple[str, str] | None = None, progress: bool = False,
                 on_module_loaded: Callable[[str, nn.Module], nn.Module] | None = None,
                 chunk_bytes: int = 64 * 1024 * 1024, skip: tuple[str, ...] = ()) -> None:
    """Fill every parameter and buffer of `model` (built on the meta device) from the checkpoint, strictly.

    `tied = (alias, source)`: `alias` (e.g. lm_head.weight) may be absent from the file; it is tied to `source`.
    `skip`: tensors of the file that are not loaded (their modules read them on demand, weights.RowReader).
    Each tensor is converted to the dtype of the parameter it fills (so swapped-in layers choose their storage).
    Tensors are read in chunks of about `chunk_bytes`, each from a fresh mapping of the file, so the memory-mapped
    pages do not all stay resident; `on_module_loaded(name, module)` runs as soon as a module's tensors are all in,
    and the module it returns takes that one's place (a quantized layer is converted there, one layer at a time).
    """
    expected = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    if tied:
        expected.pop(tied[0], None)
    files = safetensors_files(ckpt)
    found: dict[str, tuple[Path, str]] = {}
    for name, f, key in iter_tensors(files):
        if (tied and name == tied[0]) or name in skip:
            continue  # a tied head stored anyway (the embedding is the one we keep), or read on demand
        if name in found:
            raise CheckpointError(f"tensor {name!r} appears twice in {ckpt} ({found[name][1]!r} and {key!r})")
        found[name] = (f, key)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_few(unexpected)}")
        raise CheckpointError(f"checkpoint {ckpt} does not match the model: " + "; ".join(parts))

    # A module is complete when all its direct tensors are loaded.
    owner = {name: name.rpartition(".")[0] for name in expected}
    left = {}
    for name, mod in owner.items():
        left[mod] = left.get(mod, 0) + 1
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (f, key) in found.items():
        by_file.setdefault(f, []).append((name, key))
    bar = _progress(len(found), "loading weights", progress)
    for f, names in by_file.items():
        names.sort(key=lambda nk: nk[0])  # a module's tensors together
        start = 0
        while start < len(names):
            with safe_open(str(f), framework="pt") as handle:
                state, size = {}, 0
                while start < len(names) and size < chunk_bytes:
                    name, key = names[start]
                    state[name] = _read(handle, f, name, key, expected[name], device)
                    size += state[name].numel() * state[name].element_size()
                    start += 1
            model.load_state_dict(state, strict=False, assign=True)
            bar.update(len(state))
            for name in state:
                mod = owner[name]
                left[mod] -= 1
                if left[mod] == 0 and on_module_loaded is not None and mod:
                    parent, _, child = mod.rpartition(".")
                    owner_module = model.get_submodule(parent) if parent else model
                    setattr(owner_module, child, on_module_loaded(mod, model.get_submodule(mod)))
    bar.close()
    if tied:
        model.get_submodule(tied[0].rpartition(".")[0]).weight = model.get_parameter(tied[1])
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"tensors not filled from {ckpt}: {_few(still_meta)}")


def _read(handle, f: Path, name: str, key: str, want: torch.Tensor, device) -> torch.Tensor:
    shape = tuple(handle.get_slice(key).get_shape())
    if shape != tuple(want.shape):
        raise CheckpointError(f"tensor {name!r} in {f.name} has shape {list(shape)}, "
                              f"the model expects {list(want.shape)}")
    t = handle.get_tensor(key)
    if t.is_floating_point() != want.is_floating_point():
        raise CheckpointError(f"tensor {name!r} in {f.name} is {t.dtype}, the model expects {want.dtype}")
    return t.to(device=device, dtype=want.dtype)


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", leave=False)
