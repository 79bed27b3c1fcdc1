"""Save and load a [`UNet3D`][cpcbm_blocks.unet.UNet3D]: the spec as JSON, the weights as safetensors.

A checkpoint is a directory with two files:

* `spec.json`: [`UNetSpec.to_json`][cpcbm_blocks.spec.UNetSpec.to_json], which carries `format_version`;
* `model.safetensors`: the state dict. safetensors stores raw tensors and a JSON header, so loading
  never unpickles anything (a `torch.load` of an untrusted `.pt` file can run arbitrary code).

```python
model.save_pretrained("runs/t1-to-t1c")            # or save_pretrained(model, "runs/t1-to-t1c")
model = UNet3D.from_pretrained("runs/t1-to-t1c")   # builds the saved spec, loads its weights
load_weights(other_model, "runs/t1-to-t1c")        # into an existing model; its spec must match
```

Weights are compared with the spec before anything is copied: loading a checkpoint into a model of
another spec raises [`CheckpointError`][cpcbm_blocks.errors.CheckpointError] listing the spec fields
that differ and the missing, unexpected and mis-shaped keys. The round trip is bitwise, dtypes
included.

safetensors is an optional dependency (`pip install "cpcbm-blocks[io]"`), imported only here and only
when a checkpoint is written or read.
"""

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cpcbm_blocks.errors import CheckpointError, InputError, SpecError
from cpcbm_blocks.spec import UNetSpec

__all__ = ["SPEC_FILE", "WEIGHTS_FILE", "from_pretrained", "load_weights", "save_pretrained", "spec_differences"]

SPEC_FILE = "spec.json"
"""Name of the spec file inside a checkpoint directory."""
WEIGHTS_FILE = "model.safetensors"
"""Name of the weights file inside a checkpoint directory."""

_MAX_LISTED = 12


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ImportError("cpcbm_blocks checkpoints: expected the optional dependency safetensors, which is not "
                          "installed. Install it with: pip install \"cpcbm-blocks[io]\" (or pip install safetensors).") from None
    return safetensors


def save_pretrained(model, directory: str | Path) -> Path:
    """Write `model`'s spec (`spec.json`) and weights (`model.safetensors`) into `directory`.

    The directory is created if needed; existing checkpoint files in it are overwritten. Returns the
    directory as a `Path`.

    **Arguments:**

    - `model`: a [`UNet3D`][cpcbm_blocks.unet.UNet3D].
    - `directory`: where to write the two files.
    """
    spec = _require_unet(model).spec
    directory = _directory(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"directory: expected a directory to write {SPEC_FILE} and {WEIGHTS_FILE} into, "
                              f"got the existing file {str(directory)!r}. Choose another path.")
    state = model.state_dict()
    on_meta = [key for key, value in state.items() if value.device.type == "meta"]
    if on_meta:
        raise CheckpointError(f"model: expected weights with values, got {len(on_meta)} tensor(s) on the meta device "
                              f"(e.g. {on_meta[0]!r}). Load or initialise the weights before saving.")
    safetensors = _safetensors()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(spec.to_json() + "\n")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    safetensors.torch.save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"library": "cpcbm_blocks"})
    return directory


def from_pretrained(directory: str | Path, *, device: str | torch.device = "cpu"):
    """Build the [`UNet3D`][cpcbm_blocks.unet.UNet3D] saved in `directory` and load its weights.

    The modules are created on the meta device and the saved tensors are assigned to them, so no
    time is spent on an initialisation that would be overwritten, and every parameter keeps the
    dtype it was saved with.

    **Arguments:**

    - `directory`: a directory written by [`save_pretrained`][cpcbm_blocks.checkpoint.save_pretrained].
    - `device`: where the weights are loaded (`"cpu"` by default, or e.g. `"cuda"`, `"cuda:1"`,
      `torch.device(...)`); checked first ([`InputError`][cpcbm_blocks.errors.InputError] for a
      device that does not exist or is not available here).
    """
    from cpcbm_blocks.unet import UNet3D  # unet.py imports this module for its methods

    device = _load_device(device)
    directory = _directory(directory)
    spec = _read_spec(directory)
    state = _read_weights(directory, device=device)
    with torch.device("meta"):
        model = UNet3D(spec)
    _raise_if_incompatible(model, state, saved_spec=spec, directory=directory)
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [name for name, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if left_on_meta:  # a tensor the state dict does not carry (a non-persistent buffer) would stay unallocated
        raise CheckpointError(f"{directory}: expected every tensor of the model to be loaded, got {left_on_meta} "
                              "left unallocated. This is a bug in cpcbm_blocks; please report it.")
    return model


def load_weights(model, directory: str | Path) -> None:
    """Load the weights saved in `directory` into the existing `model`, in place.

    The saved spec must equal `model.spec`; otherwise nothing is copied and
    [`CheckpointError`][cpcbm_blocks.errors.CheckpointError] lists the differing spec fields and the
    missing, unexpected and mis-shaped keys. Each weight is copied into the model's own parameter, so
    it keeps the model's device and dtype.

    **Arguments:**

    - `model`: a [`UNet3D`][cpcbm_blocks.unet.UNet3D].
    - `directory`: a directory written by [`save_pretrained`][cpcbm_blocks.checkpoint.save_pretrained].
    """
    _require_unet(model)
    directory = _directory(directory)
    saved_spec = _read_spec(directory)
    state = _read_weights(directory, device="cpu")
    _raise_if_incompatible(model, state, saved_spec=saved_spec, directory=directory)
    model.load_state_dict(state, strict=True)


def spec_differences(saved: UNetSpec, current: UNetSpec) -> list[str]:
    """The fields in which two specs differ, as `path: checkpoint X, model Y` lines (empty when equal)."""
    return _differences(json.loads(saved.to_json()), json.loads(current.to_json()), "spec")


def _differences(saved: Any, current: Any, path: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for key in [*saved, *(k for k in current if k not in saved)]:
            if key not in current:
                lines.append(f"{path}.{key}: checkpoint {saved[key]!r}, model has no such field")
            elif key not in saved:
                lines.append(f"{path}.{key}: checkpoint has no such field, model {current[key]!r}")
            else:
                lines.extend(_differences(saved[key], current[key], f"{path}.{key}"))
        return lines
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [line for i, (a, b) in enumerate(zip(saved, current)) for line in _differences(a, b, f"{path}[{i}]")]
    if isinstance(saved, list) and isinstance(current, list):
        return [f"{path}: checkpoint has {len(saved)} entries, model {len(current)}"]
    return [] if saved == current else [f"{path}: checkpoint {saved!r}, model {current!r}"]


def _raise_if_incompatible(model, state: dict[str, Tensor], *, saved_spec: UNetSpec, directory: Path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mis_shaped = [f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(value.shape)}"
                  for key, value in expected.items() if key in state and state[key].shape != value.shape]
    fields = spec_differences(saved_spec, model.spec)
    if not (fields or missing or unexpected or mis_shaped):
        return
    parts = [f"directory {str(directory)!r}: expected a checkpoint saved from the model's spec, got one that differs."]
    for title, items in (("differing spec fields", fields), ("missing keys (in the model, not in the checkpoint)", missing),
                         ("unexpected keys (in the checkpoint, not in the model)", unexpected),
                         ("keys with another shape", mis_shaped)):
        if items:
            listed = items[:_MAX_LISTED] + ([f"... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else [])
            parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(listed))
    parts.append("Build the checkpoint's own model with UNet3D.from_pretrained(directory), or load a checkpoint "
                 "saved from this spec.")
    raise CheckpointError("\n".join(parts))


def _directory(directory) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise CheckpointError(f"directory: expected a path (str or pathlib.Path) of a checkpoint directory, got "
                              f"{type(directory).__name__}. Pass the directory given to save_pretrained().")
    return Path(directory)


def _load_device(device) -> torch.device:
    """`device` parsed and available here, before any file is read (a bad device is not a bad file)."""
    example = "Pass e.g. device='cpu', device='cuda' or device=torch.device('cuda', 0)."
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InputError(f"device: expected a device name (str), index (int) or torch.device, got "
                         f"{type(device).__name__} {device!r}. {example}")
    if isinstance(device, int) and device < 0:
        raise InputError(f"device: expected a non-negative device index, got {device}. {example}")
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 reads an index as one of the accelerator
    if isinstance(device, int) and accelerator is not None and not accelerator.is_available():
        raise InputError(f"device: expected an available device, got index {device}, but no accelerator (CUDA, MPS, "
                         "...) is available here (torch.accelerator.is_available() is False). Load with device='cpu'.")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"device: expected a device such as 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}, which "
                         f"torch does not know. {example}") from None
    shown = repr(device) if str(parsed) == str(device) else f"{device!r} ({parsed})"
    if parsed.type == "meta":
        raise InputError(f"device: expected a device that holds the loaded values, got {shown}. Load on 'cpu' or "
                         "'cuda'; for a model without weights, build it under `with torch.device('meta'): UNet3D(spec)`.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device: expected an available device, got {shown}, but CUDA is not available here "
                             "(torch.cuda.is_available() is False). Load with device='cpu', or run on a machine with a "
                             "GPU and a CUDA build of PyTorch.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device: expected one of the {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}), got {shown}. Pass an index in that range.")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device: expected an available device, got {shown}, but MPS is not available here "
                         "(torch.backends.mps.is_available() is False). Load with device='cpu'.")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=parsed)
        except (RuntimeError, AssertionError, ValueError, NotImplementedError) as error:
            raise InputError(f"device: expected an available device, got {shown}, which cannot hold tensors here "
                             f"({error}). Load with device='cpu'.") from None
    return parsed


def _read_spec(directory: Path) -> UNetSpec:
    path = directory / SPEC_FILE
    if directory.is_file():
        raise CheckpointError(f"directory: expected a checkpoint directory holding {SPEC_FILE} and {WEIGHTS_FILE}, got "
                              f"the file {str(directory)!r}. Pass the directory that contains it: "
                              f"{str(directory.parent)!r}.")
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "no such directory"
        raise CheckpointError(f"directory: expected {SPEC_FILE} and {WEIGHTS_FILE} in {str(directory)!r}, got {found}. "
                              "Pass a directory written by save_pretrained().")
    try:
        return UNetSpec.from_json(path.read_text())
    except SpecError as error:
        raise CheckpointError(f"{path}: {error}") from error


def _read_weights(directory: Path, *, device: str | torch.device) -> dict[str, Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(f"directory: expected {WEIGHTS_FILE} next to {SPEC_FILE} in {str(directory)!r}, got {found}. "
                              "Pass a directory written by save_pretrained().")
    safetensors = _safetensors()
    try:
        return safetensors.torch.load_file(str(path), device=str(device))
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{path}: expected a safetensors file, got one that cannot be read ({error}). "
                              "The file may be truncated; save it again.") from error


def _require_unet(model):
    from cpcbm_blocks.unet import UNet3D

    if not isinstance(model, UNet3D):
        raise CheckpointError(f"model: expected a UNet3D, got {type(model).__name__}. "
                              "Save and load models built with UNet3D(spec).")
    return model
