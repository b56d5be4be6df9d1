"""Argument checks every layer shares: integers that really are integers.

Python counts ``True`` as the int 1, and converting ``[0, 2.7, 5]`` with
``dtype=torch.int64`` truncates 2.7 to 2 without a word, so a bool or a float
where an integer (or an index vector) goes would be read as some other valid
value. Every public entry point takes its integers through these two
functions, which raise a TypeError naming the argument instead.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["integer", "index_vector"]


def integer(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (anything with ``__index__``: int, numpy or 0-d
    integer tensor); a bool or a float raises TypeError naming ``name``, a value
    below ``minimum`` ValueError.

    >>> integer(3, "window")
    3
    >>> integer(True, "num_keys")
    Traceback (most recent call last):
    TypeError: num_keys must be an int, got bool True
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number!r}")
    return number


def index_vector(value, name: str, device=None) -> torch.Tensor:
    """Return ``value`` as a 1-D int64 tensor (for exact host-side arithmetic).

    Integer tensors and sequences of ints are accepted. Bools and floats raise
    TypeError, from a tensor or a list alike: converting ``[0, 2.7, 5]`` with
    ``dtype=int64`` would truncate 2.7 to 2 silently, and True would become 1.
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        if isinstance(value, (list, tuple)) and any(isinstance(item, bool) for item in value):
            raise TypeError(f"{name} must hold ints, got a bool in {value!r}")
        try:
            tensor = torch.as_tensor(value, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            kind = ValueError if "Overflow" in str(error) else TypeError
            raise kind(
                f"{name} must be a 1-D integer tensor or sequence of int64: {error}"
            ) from None
        if tensor.numel() == 0 and tensor.dtype == torch.float32:
            tensor = tensor.to(torch.int64)  # [] has no dtype of its own: torch guesses float32
    if tensor.dtype == torch.bool:
        raise TypeError(
            f"{name} must be integer indices, got bool values (dtype {tensor.dtype}); "
            "for a boolean mask pass torch.nonzero(mask).flatten()"
        )
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor or sequence, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.int64)
