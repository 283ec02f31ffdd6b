"""Reading a model's weights one tensor at a time, straight from its safetensors files.

Spectral scans must not load the whole model: a 12B model in fp32 is 48 GB. Each block of a tensor is read through
its own short-lived `safe_open`, so the memory map (whose touched pages count as resident memory) is released after
every read and peak memory stays below the size of one tensor. Only safetensors are read; pickled `.bin` checkpoints
are refused.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from dolphin_forge.errors import ForgeError
from dolphin_forge.models.lora import is_adapter_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: safetensors' names of the floating-point dtypes a model can be saved back in.
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

#: `model.layers.12.mlp.down_proj.weight` -> layer 12, module type `mlp.down_proj`.
_LAYER_WEIGHT = re.compile(r"^.*?\.(?P<layer>\d+)\.(?P<type>.+)\.weight$")


def open_safetensors(file: Path) -> Any:
    """`safe_open` on one weights file; a truncated or damaged one (an interrupted copy) is a user error."""
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as exc:
        raise ForgeError(f"{file}: not a readable safetensors file (truncated or corrupt: {exc})") from None


def layer_weight_type(name: str) -> str | None:
    """The module type of a numbered layer's weight (`mlp.down_proj`), None for any other tensor or parameter."""
    match = _LAYER_WEIGHT.match(name)
    return match["type"] if match else None


def is_module_type(module_type: str, wanted: str) -> bool:
    """Whether a configured type names this module type: in full (`mlp.up_proj`) or by its last parts (`up_proj`)."""
    return module_type == wanted or module_type.endswith("." + wanted)


@dataclass(frozen=True)
class LayerMatrix:
    """A 2-D weight inside a numbered layer: where it is stored and what kind of matrix it is."""

    tensor: str  # tensor name, e.g. model.layers.3.mlp.up_proj.weight
    module: str  # module name, e.g. model.layers.3.mlp.up_proj
    module_type: str  # e.g. mlp.up_proj
    layer: int
    shape: tuple[int, int]


class Checkpoint:
    """The tensor index of a local HF model folder (single file or sharded)."""

    def __init__(self, folder: str | Path, key: str = "model"):
        """`key` is the config key the folder came from (`base_model`, `spectrum.model`, ...): errors name it."""
        self.folder = Path(folder)
        self.key = key
        self.files = self._tensor_files()
        self.shapes, self.dtypes = self._headers()

    def _tensor_files(self) -> dict[str, Path]:
        """Transformers' order: `model.safetensors`, else the index, else the other `*.safetensors` files.

        Mistral folders also ship `consolidated*.safetensors`, the same weights under other names: never read.
        """
        if not self.folder.is_dir():
            raise ForgeError(f"{self.key}: {self.folder} is not a folder")
        if is_adapter_folder(self.folder):  # else: its lora_A/lora_B weights match no module type
            raise ForgeError(
                f"{self.key}: {self.folder} is a LoRA adapter, not a model; merge it first "
                "(dolphin-forge merge-lora ADAPTER OUT) and name the merged folder"
            )
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        if index.is_file() and not single.is_file():
            return self._indexed_files(index)
        files = [single] if single.is_file() else sorted(
            p for p in self.folder.glob("*.safetensors") if not p.name.startswith("consolidated")
        )
        if not files:
            pickled = sorted(p.name for p in self.folder.glob("*.bin"))
            consolidated = sorted(p.name for p in self.folder.glob("consolidated*.safetensors"))
            hint = (
                f" (found {', '.join(pickled)}: pickled weights are not read; convert them to safetensors)" if pickled
                else f" in Hugging Face layout (found {', '.join(consolidated)}: Mistral's own format; use the HF "
                "conversion of the model)" if consolidated else ""
            )
            raise ForgeError(f"{self.key}: {self.folder} has no .safetensors weights{hint}")
        names: dict[str, Path] = {}
        for file in files:
            with open_safetensors(file) as handle:
                names.update({name: file for name in handle.keys()})
        return names

    def _indexed_files(self, index: Path) -> dict[str, Path]:
        """The index's `weight_map`, checked: a hand-edited index must not fail deep inside the scan."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ForgeError(f"{index}: expected a JSON object with a `weight_map`") from None
        if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
            raise ForgeError(f"{index}: weight_map should map tensor names to files")
        return {name: self.folder / file for name, file in weight_map.items()}

    def _headers(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """Each tensor's shape and safetensors dtype (`BF16`, ...), from the file headers: no weight is read."""
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for file in sorted(set(self.files.values())):
            if not file.is_file():
                raise ForgeError(f"{self.key}: {file} is listed in {INDEX_FILE} but missing")
            with open_safetensors(file) as handle:
                for name in handle.keys():
                    part = handle.get_slice(name)
                    shapes[name], dtypes[name] = tuple(part.get_shape()), part.get_dtype()
        return shapes, dtypes

    def weight_dtype(self) -> torch.dtype | None:
        """The floating-point dtype most 2-D weights are stored in: what config.json should declare but may not."""
        stored = Counter(
            _FLOAT_DTYPES[dtype] for name, dtype in self.dtypes.items()
            if len(self.shapes[name]) == 2 and dtype in _FLOAT_DTYPES
        )
        return stored.most_common(1)[0][0] if stored else None

    def read_blocks(self, name: str, size: int, dim: int) -> Iterator[torch.Tensor]:
        """A 2-D tensor in consecutive blocks of `size` rows (dim 0) or columns (dim 1), each read on its own.

        Every block has its own short-lived mapping, so even the pages a strided column read touches are
        released block by block.
        """
        total = self.shapes[name][dim]
        for start in range(0, total, size):
            with safe_open(self.files[name], framework="pt") as handle:
                part = handle.get_slice(name)
                yield part[start : start + size] if dim == 0 else part[:, start : start + size]

    def layer_matrices(
        self, module_types: list[str], layers: list[int] | None = None, section: str = "spectrum"
    ) -> list[LayerMatrix]:
        """The 2-D layer weights whose module type is one of `module_types` (a full type or its last part).

        Raises ForgeError naming the config key (under `section`) and the types that match nothing, so a typo is not
        silently an empty scan; likewise for `layers` outside the model's layers. A weight that several entries name
        (`q_proj` and `self_attn.q_proj`) is listed once and counts as a match for each of them.
        """
        found: list[LayerMatrix] = []
        used: set[str] = set()
        for name, shape in self.shapes.items():
            match = _LAYER_WEIGHT.match(name)
            if match is None or len(shape) != 2:
                continue
            module_type = match["type"]
            wanted = {t for t in module_types if is_module_type(module_type, t)}
            if not wanted:
                continue
            used |= wanted
            if layers is not None and int(match["layer"]) not in layers:
                continue
            found.append(
                LayerMatrix(
                    tensor=name,
                    module=name.removesuffix(".weight"),
                    module_type=module_type,
                    layer=int(match["layer"]),
                    shape=(int(shape[0]), int(shape[1])),
                )
            )
        unknown = [t for t in module_types if t not in used]
        if unknown:
            raise ForgeError(
                f"{section}.module_types: {', '.join(unknown)} match no 2-D layer weight in {self.folder} "
                f"(this model has: {', '.join(self.layer_types()) or 'none'})"
            )
        if layers is not None:
            self._check_layers(layers, found, section)
        return sorted(found, key=lambda m: (m.layer, m.module_type))

    def layer_types(self) -> list[str]:
        """The module types of the 2-D layer weights stored here (`mlp.down_proj`, ...), sorted."""
        return sorted({t for n, s in self.shapes.items() if len(s) == 2 and (t := layer_weight_type(n))})

    def _check_layers(self, layers: list[int], found: list[LayerMatrix], section: str) -> None:
        """A layer number the model does not have is a mistake (a config written for a deeper model), not a no-op."""
        present = sorted({int(m["layer"]) for n in self.shapes if (m := _LAYER_WEIGHT.match(n))})
        valid = f"{present[0]}..{present[-1]}"
        outside = [layer for layer in layers if not present[0] <= layer <= present[-1]]
        if outside:
            listed = ", ".join(str(layer) for layer in outside)
            raise ForgeError(
                f"{section}.layers: {listed} outside the layers of {self.folder} (expected numbers in {valid})"
            )
        if not found:
            raise ForgeError(f"{section}.layers: {layers} selects no layer of {self.folder} (it has layers {valid})")

    def embedding_tensors(self) -> list[str]:
        """2-D weights outside the numbered layers (token embeddings, an untied output head), head first."""
        outside = [n for n, s in self.shapes.items() if len(s) == 2 and _LAYER_WEIGHT.match(n) is None]
        return sorted(outside, key=lambda n: (not any(k in n for k in ("lm_head", "embed_out", "output")), n))
