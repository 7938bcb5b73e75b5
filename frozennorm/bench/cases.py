"""What the op-level benchmark measures: shapes, dtypes, layouts, modes, and their filters."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]

#: BatchNorm inputs of ResNet-50 (stem, then the last BN of each stage), by preset name.
SHAPES: Dict[str, Shape] = {
    # Faster R-CNN ResNet-50-FPN, 2 images at 800x1216: strides 2, 4, 8, 16, 32.
    "det-stem": (2, 64, 400, 608),
    "det-c2": (2, 256, 200, 304),
    "det-c3": (2, 512, 100, 152),
    "det-c4": (2, 1024, 50, 76),
    "det-c5": (2, 2048, 25, 38),
    # Classification, 32 images at 224x224.
    "cls-stem": (32, 64, 112, 112),
    "cls-c2": (32, 256, 56, 56),
    "cls-c3": (32, 512, 28, 28),
    "cls-c4": (32, 1024, 14, 14),
    "cls-c5": (32, 2048, 7, 7),
    # One image: small maps, where per-call overhead (dispatch, launches) dominates.
    "small-c2": (1, 256, 56, 56),
    "small-c5": (1, 2048, 7, 7),
    "tiny": (1, 64, 7, 7),
}

GROUPS: Dict[str, List[str]] = {
    "det": [n for n in SHAPES if n.startswith("det-")],
    "cls": [n for n in SHAPES if n.startswith("cls-")],
    "small": ["small-c2", "small-c5", "tiny"],
    "all": list(SHAPES),
}

#: The quick default: one detection map, one classification map, one small map.
QUICK_SHAPES = ["det-c4", "cls-c5", "small-c5"]

DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "half": "float16"}
QUICK_DTYPES = ["float32", "bfloat16"]

LAYOUTS: Dict[str, torch.memory_format] = {
    "nchw": torch.contiguous_format, "channels_last": torch.channels_last}
LAYOUT_ALIASES = {"contiguous": "nchw", "cl": "channels_last", "nhwc": "channels_last"}

#: inference: forward under no_grad; training: forward + backward to the input.
MODES = ("inference", "training")


@dataclass(frozen=True)
class Case:
    """One op-level measurement: a BatchNorm input and what is done with it."""

    shape_name: str
    shape: Shape
    dtype: str
    layout: str
    mode: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def tensor_bytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def ideal_bytes(self) -> int:
        """Bytes an ideal single pass moves: read input, write output (and the same for
        grad_output -> grad_input in training)."""
        return self.tensor_bytes * (2 if self.mode == "inference" else 4)

    @property
    def label(self) -> str:
        return f"{self.shape_name} {self.dtype} {self.layout} {self.mode}"

    def make_input(self, device: str) -> torch.Tensor:
        x = torch.randn(self.shape, device=device).to(DTYPES[self.dtype])
        return x.contiguous(memory_format=LAYOUTS[self.layout])


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def parse_dims(text: str, ndim: Optional[int] = None) -> Shape:
    """``"2x256x200x304"`` -> ``(2, 256, 200, 304)``."""
    try:
        dims = tuple(int(d) for d in text.lower().replace("×", "x").split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims) or (ndim is not None and len(dims) != ndim):
        want = f"{ndim} " if ndim else ""
        raise ValueError(f"{text!r} is not {want}positive sizes joined by 'x' (e.g. 2x256x200x304)")
    return dims


def parse_shapes(tokens: Iterable[str]) -> List[Tuple[str, Shape]]:
    """Preset names, group names (det, cls, small, all) or NxCxHxW, in order, deduplicated."""
    out: Dict[str, Shape] = {}
    for token in tokens:
        token = token.strip()
        if token in GROUPS:
            out.update((n, SHAPES[n]) for n in GROUPS[token])
        elif token in SHAPES:
            out[token] = SHAPES[token]
        else:
            try:
                out[token] = parse_dims(token, ndim=4)
            except ValueError as e:
                raise ValueError(f"unknown shape {token!r}: use a preset ({', '.join(SHAPES)}), "
                                 f"a group ({', '.join(GROUPS)}) or NxCxHxW") from e
    return list(out.items())


def _canonical(tokens: Iterable[str], known: Sequence[str], aliases: Dict[str, str],
               what: str) -> List[str]:
    out: List[str] = []
    for token in tokens:
        name = aliases.get(token.strip().lower(), token.strip().lower())
        if name not in known:
            raise ValueError(f"unknown {what} {token!r}: choose from {', '.join(known)}")
        if name not in out:
            out.append(name)
    return out


def parse_dtypes(tokens: Iterable[str]) -> List[str]:
    return _canonical(tokens, list(DTYPES), DTYPE_ALIASES, "dtype")


def parse_layouts(tokens: Iterable[str]) -> List[str]:
    return _canonical(tokens, list(LAYOUTS), LAYOUT_ALIASES, "layout")


def parse_modes(tokens: Iterable[str]) -> List[str]:
    return _canonical(tokens, list(MODES), {"fwd": "inference", "forward": "inference",
                                            "train": "training", "fwd+bwd": "training"}, "mode")


def make_cases(shapes: Sequence[Tuple[str, Shape]], dtypes: Sequence[str],
               layouts: Sequence[str], modes: Sequence[str]) -> List[Case]:
    """Every combination, grouped by shape first (the order the tables use)."""
    return [Case(name, shape, dtype, layout, mode) for (name, shape), dtype, layout, mode
            in itertools.product(shapes, dtypes, layouts, modes)]
