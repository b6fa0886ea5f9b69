"""``batchnorm doctor MODULE:FACTORY [--checkpoint PATH] [--data SOURCE] [--json]``.

Builds the model with ``FACTORY()`` (``path/to/file.py:make_model`` or ``package.module:make``),
loads the checkpoint into it (a state dict, or a dict holding one under "state_dict"/"model";
a DistributedDataParallel "module." prefix is removed), runs ``batchnorm.torch.doctor`` and
prints the findings. Exit status: 0 = nothing severe, 1 = a severe finding, 2 = the model, the
checkpoint or the data could not be loaded (a message, never a traceback: those are the user's
files, not our bug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._errors import describe_exception


class LoadError(Exception):
    """The factory, checkpoint or data could not be used; the message says why."""


def _describe(exc: BaseException) -> str:
    return describe_exception(exc, library_dirs=(os.path.dirname(os.path.abspath(__file__)),))


def build_model(spec: str) -> Any:
    import torch

    from .testing.cli import TargetError, load_target

    try:
        (factory,) = load_target(spec)
    except TargetError as exc:
        raise LoadError(str(exc)) from None
    except ValueError:
        raise LoadError(f"expected one MODULE:FACTORY, got {spec!r}") from None
    try:
        model = factory()
    except Exception as exc:
        raise LoadError(f"{spec}() raised {_describe(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise LoadError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_checkpoint(model: Any, path: str) -> None:
    import torch

    if not os.path.isfile(path):
        raise LoadError(f"no such checkpoint file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(f"cannot read checkpoint {path}: {_describe(exc)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise LoadError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # missing/unexpected keys, shape mismatches: torch says which
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:4])
        raise LoadError(f"checkpoint {path} does not fit the model: {detail}") from None


def load_batches(source: str, batch_size: int) -> list[Any]:
    """A .pt file (a tensor, or a list of batches), .npy/.npz (an array), or MODULE:FUNC
    returning an iterable of batches. A single tensor is split into ``batch_size`` rows, the
    leftover rows added to the last full batch."""
    import numpy as np
    import torch

    if source.endswith((".pt", ".pth", ".npy", ".npz")) and not os.path.isfile(source):
        raise LoadError(f"no such data file: {source}")
    if os.path.isfile(source):
        try:
            if source.endswith((".npy", ".npz")):
                data = np.load(source)
                data = data[data.files[0]] if hasattr(data, "files") else data
                data = torch.from_numpy(np.asarray(data, dtype=np.float32))
            else:
                data = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LoadError(f"cannot read data {source}: {_describe(exc)}") from None
    else:
        from .testing.cli import TargetError, load_target

        try:
            (func,) = load_target(source)
            data = func()
        except TargetError as exc:
            raise LoadError(f"--data {source}: {exc}") from None
        except Exception as exc:
            raise LoadError(f"--data {source} raised {_describe(exc)}") from None
    if isinstance(data, torch.Tensor):
        if data.ndim < 2 or data.shape[0] == 0:
            raise LoadError(f"data tensor of shape {tuple(data.shape)}: need (N, C, ...), N > 0")
        batches = list(data.split(batch_size))
        if len(batches) > 1 and batches[-1].shape[0] < batch_size:
            # The split's leftover rows join the batch before: alone they would be a small
            # batch of the command's own making (65 rows at 32 gave a "batch of 1", severe).
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches
    try:
        batches = list(data)
    except TypeError:
        raise LoadError(f"data is a {type(data).__name__}, not a tensor or batches") from None
    if not batches:
        raise LoadError(f"data {source} holds no batch")
    return batches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchnorm doctor",
        description="Check a trained model's batch norm: per layer, findings and their fix.",
    )
    parser.add_argument("factory", help="MODULE:FACTORY or path/file.py:FACTORY (no arguments)")
    parser.add_argument("--checkpoint", help="state dict to load into the model (torch.save)")
    parser.add_argument(
        "--data", help="batches: a .pt/.npy/.npz file or MODULE:FUNC returning an iterable"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    parser.add_argument("--num-batches", type=int, default=8, help="batches used (default 8)")
    parser.add_argument("--json", action="store_true", help="JSON instead of text")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.batch_size <= 0 or args.num_batches <= 0:
        parser.error("--batch-size and --num-batches must be positive")
    try:
        model = build_model(args.factory)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        batches = load_batches(args.data, args.batch_size) if args.data else None
    except LoadError as exc:
        print(f"batchnorm doctor: {exc}", file=sys.stderr)
        return 2
    from .torch.doctor import doctor

    try:
        report = doctor(model, batches, num_batches=args.num_batches)
    except (TypeError, ValueError, RuntimeError) as exc:  # the data does not fit the model
        print(f"batchnorm doctor: running the model failed: {_describe(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else str(report))
    return 1 if report.severe else 0
