"""Finding the Linear layers to adapt and MoLA's layer-wise expert allocation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["Allocation", "layer_index", "find_targets", "count_layers", "experts_per_layer"]


Allocation = int | str | Sequence[int]


def layer_index(module_path: str) -> int | None:
    """The transformer layer of a module path: its first integer component.

    "model.layers.3.self_attn.q_proj" -> 3; "lm_head" -> None.
    """
    for part in module_path.split("."):
        if part.isdigit():
            return int(part)
    return None


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """(path, module) of every module whose name is, or ends with "." + , one of target_modules.

    Raises:
        ValueError: nothing matches (the message lists some module names to pick from).
        TypeError: a matching module is not an nn.Linear.
    """
    suffixes = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError(f"target_modules must be a non-empty name or list of names, got {target_modules!r}")
    found = []
    for path, module in model.named_modules():
        if not path or not any(path == s or path.endswith("." + s) for s in suffixes):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target module '{path}' is a {type(module).__name__}, not an nn.Linear; "
                "target the Linear layers inside it (e.g. 'q_proj', 'gate_proj')"
            )
        found.append((path, module))
    if not found:
        leaves = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no module matches target_modules={suffixes!r}; the model's Linear names are {leaves}")
    return found


def count_layers(model: nn.Module, paths: Sequence[str], num_layers: int | None) -> int:
    """num_layers if given, else model.config.num_hidden_layers, else 1 + the largest target layer index."""
    if num_layers is not None:
        return num_layers
    configured = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(configured, int) and configured > 0:
        return configured
    indices = [i for i in (layer_index(p) for p in paths) if i is not None]
    return max(indices) + 1 if indices else 1


def experts_per_layer(allocation: Allocation, num_layers: int) -> list[int]:
    """Experts per adapted linear for each of `num_layers` layers.

    Args:
        allocation: an int (same count everywhere); a MoLA string "2-4-6-8" (the layers are
            split into len(parts) equal contiguous groups, group g gets parts[g] experts; the
            number of layers must be divisible by the number of parts); or a list with one
            count per layer.

    Raises:
        ValueError: malformed string, counts < 1, or a length that does not fit num_layers.
    """
    if isinstance(allocation, bool):
        raise TypeError(f"experts_per_layer must be an int, a string like '2-4-6-8' or a list, got {allocation!r}")
    if isinstance(allocation, int):
        counts = [allocation] * num_layers
    elif isinstance(allocation, str):
        try:
            parts = [int(p) for p in allocation.strip().split("-")]
        except ValueError:
            raise ValueError(
                f"experts_per_layer string must be counts joined by '-', e.g. '2-4-6-8', got {allocation!r}"
            ) from None
        if num_layers % len(parts) != 0:
            raise ValueError(
                f"allocation {allocation!r} has {len(parts)} groups but the model has {num_layers} layers, "
                f"which is not divisible by {len(parts)}; use a string whose group count divides {num_layers} "
                "or pass an explicit list with one count per layer"
            )
        group = num_layers // len(parts)
        counts = [parts[i // group] for i in range(num_layers)]
    else:
        counts = list(allocation)
        if len(counts) != num_layers:
            raise ValueError(
                f"experts_per_layer list has {len(counts)} entries but the model has {num_layers} layers; "
                "give one count per layer"
            )
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"expert counts must be ints >= 1, got {c!r} in {allocation!r}")
    return counts
