"""The argument checks of ``hardneg._checks`` called directly: each accepts exactly what its
docstring allows (boundaries included), returns the value in the promised type, and refuses the
rest with the whole message, written out here (the loss tests reach these checks only through
the parameters a loss happens to have)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hardneg._checks import (
    check_choice,
    check_flag,
    check_index,
    check_labels,
    check_number,
    closest_hint,
)


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_closest_hint_names_the_nearest_choice_or_nothing():
    choices = ["ring", "hcl", "unremix"]
    assert closest_hint("rnig", choices) == " (did you mean 'ring'?)"
    assert closest_hint("unremx", choices) == " (did you mean 'unremix'?)"
    assert closest_hint("zzzzzz", choices) == ""
    assert closest_hint(5, ["5", "6"]) == " (did you mean '5'?)"  # a non-string value


@pytest.mark.parametrize(
    "value,integer,message",
    [
        (True, False, "x must be a number, got True (bool)"),
        ("3", False, "x must be a number, got '3' (str)"),
        (True, True, "x must be an integer, got True (bool)"),
        (None, True, "x must be an integer, got None (NoneType)"),
        (2.5, True, "x must be an integer, got 2.5"),
        (float("nan"), False, "x must be finite, got nan"),
        (float("-inf"), False, "x must be finite, got -inf"),
    ],
)
def test_check_number_refuses_what_is_not_a_finite_real_of_the_kind_asked(value, integer, message):
    assert refused(check_number, "x", value, integer=integer) == message


def test_check_number_refuses_numpys_bool_too():
    """numpy's bool is no ``numbers.Real``; a numpy float or int is (a sweep's values)."""
    flag = np.bool_(True)
    assert refused(check_number, "x", flag) == (
        f"x must be a number, got {flag!r} ({type(flag).__name__})"
    )


def test_check_number_returns_a_float_or_an_int():
    got = check_number("x", np.float32(0.25))
    assert got == 0.25 and type(got) is float
    got = check_number("x", 3)
    assert got == 3.0 and type(got) is float
    got = check_number("k", 3.0, integer=True)
    assert got == 3 and type(got) is int
    got = check_number("k", np.int64(7), low=0, integer=True)
    assert got == 7 and type(got) is int


@pytest.mark.parametrize(
    "bounds,inside,outside,message",
    [
        # the ends themselves: inclusive accepts them, exclusive refuses them
        (dict(low=0.0), [0.0, 1e9], -1e-9, "x must be in [0, inf), got -1e-09"),
        (dict(low=0.0, low_inclusive=False), [1e-12], 0.0, "x must be in (0, inf), got 0.0"),
        (dict(high=1.0), [1.0, -1e9], 1.0000001, "x must be in (-inf, 1], got 1.0000001"),
        (dict(high=1.0, high_inclusive=False), [0.999], 1.0, "x must be in (-inf, 1), got 1.0"),
        (dict(low=0.5, high=2.0), [0.5, 2.0], 2.5, "x must be in [0.5, 2], got 2.5"),
        (
            dict(low=0.5, high=2.0, low_inclusive=False, high_inclusive=False),
            [0.51, 1.99],
            0.5,
            "x must be in (0.5, 2), got 0.5",
        ),
        (
            dict(low=0.5, high=2.0, low_inclusive=False),
            [2.0],
            2.0001,
            "x must be in (0.5, 2], got 2.0001",
        ),
    ],
)
def test_check_number_keeps_the_range_and_writes_it_with_its_open_and_closed_ends(
    bounds, inside, outside, message
):
    for value in inside:
        assert check_number("x", value, **bounds) == value
    assert refused(check_number, "x", outside, **bounds) == message


def test_check_choice_returns_the_choice_and_lists_the_allowed_ones():
    assert check_choice("mode", "max", ("max", "mean")) == "max"
    assert (
        refused(check_choice, "mode", "sum", ("max", "mean"))
        == "mode must be one of 'max', 'mean', got 'sum'"
    )


def test_check_flag_takes_only_a_bool():
    assert check_flag("f", False) is False and check_flag("f", True) is True
    assert refused(check_flag, "f", 1) == "f must be True or False, got 1"
    assert refused(check_flag, "f", "yes") == "f must be True or False, got 'yes'"


def test_check_labels_takes_a_vector_of_integer_ids_of_the_row_count():
    labels = torch.tensor([0, 3, 3])
    assert check_labels("labels", labels, 3) is labels
    assert (
        refused(check_labels, "labels", [0, 3, 3], 3)
        == "labels must be a torch.Tensor of integer class ids, got list"
    )
    assert refused(check_labels, "labels", labels, 4) == "labels must have shape (4,), got (3,)"
    assert (
        refused(check_labels, "labels", labels.view(3, 1), 3)
        == "labels must have shape (3,), got (3, 1)"
    )
    for dtype in (torch.float32, torch.complex64):
        assert (
            refused(check_labels, "labels", torch.zeros(3, dtype=dtype), 3)
            == f"labels must hold integer class ids, got dtype {dtype}"
        )


def test_check_index_takes_integer_positions_inside_the_pool():
    index = torch.tensor([0, 4, 2])
    assert check_index("exclude_index", index, 3, 5) is index
    assert check_index("exclude_index", torch.zeros(0, dtype=torch.long), 0, 0).numel() == 0
    assert (
        refused(check_index, "exclude_index", [0, 4, 2], 3, 5)
        == "exclude_index must be a torch.Tensor of integer positions, got list"
    )
    for dtype in (torch.float32, torch.float64, torch.complex64, torch.bool):
        assert (
            refused(check_index, "exclude_index", torch.zeros(3, dtype=dtype), 3, 5)
            == f"exclude_index must hold integer positions, got dtype {dtype}"
        )
    assert (
        refused(check_index, "exclude_index", index[:2], 3, 5)
        == "exclude_index must have shape (3,) (one entry per query), got (2,)"
    )
    for bad, first in (([0, 5, 2], 5), ([0, -1, 7], -1)):
        assert (
            refused(check_index, "exclude_index", torch.tensor(bad), 3, 5)
            == f"exclude_index must hold positions in [0, 5) of the pool, got {first}"
        )
