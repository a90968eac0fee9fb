"""Continual-learning measures checked against hand-computed values (arithmetic in the comments)."""

from __future__ import annotations

import pytest

from tau2cl.cl.measures import (
    average_performance,
    backward_transfer,
    forgetting,
    forward_transfer,
    transfer_metrics,
)

# Seed example: airline 0.456 right after it was learned, 0.423 after retail; retail 0.389.
SEED_R = [
    [0.100, 0.200],  # base model
    [0.456, 0.250],  # after airline
    [0.423, 0.389],  # after retail
]

# Three domains. Rows: base, after domain 1, after domain 2, after domain 3.
R3 = [
    [0.10, 0.20, 0.30],
    [0.50, 0.25, 0.35],
    [0.55, 0.60, 0.32],
    [0.45, 0.50, 0.70],
]


def test_documented_example_after_stage_2():
    m = transfer_metrics(SEED_R, 2)
    # BWT = 0.423 - 0.456 = -0.0330
    assert m["backward_transfer"] == pytest.approx(-0.0330)
    # A = (0.423 + 0.389) / 2 = 0.4060
    assert m["average_performance"] == pytest.approx(0.4060)
    # F = max(R[1][airline]) - R[2][airline] = 0.456 - 0.423 = 0.0330
    assert m["forgetting"] == pytest.approx(0.0330)
    # FWT = R[1][retail] - R[0][retail] = 0.25 - 0.20 = 0.05
    assert m["forward_transfer"] == pytest.approx(0.05)


def test_three_domains_after_stage_3():
    # A_3   = (0.45 + 0.50 + 0.70) / 3 = 1.65 / 3 = 0.55
    # BWT_3 = ((0.45 - 0.50) + (0.50 - 0.60)) / 2 = (-0.05 - 0.10) / 2 = -0.075
    # F_3   = ((max(0.50, 0.55) - 0.45) + (max(0.60) - 0.50)) / 2 = (0.10 + 0.10) / 2 = 0.10
    #         (domain 1 peaked at 0.55 after stage 2, not when it was learned: forgetting != -BWT)
    # FWT_3 = ((R[1][2] - R[0][2]) + (R[2][3] - R[0][3])) / 2 = ((0.25 - 0.20) + (0.32 - 0.30)) / 2 = 0.035
    assert average_performance(R3, 3) == pytest.approx(0.55)
    assert backward_transfer(R3, 3) == pytest.approx(-0.075)
    assert forgetting(R3, 3) == pytest.approx(0.10)
    assert forward_transfer(R3, 3) == pytest.approx(0.035)


def test_three_domains_after_stage_2():
    # A_2   = (0.55 + 0.60) / 2 = 0.575
    # BWT_2 = 0.55 - 0.50 = 0.05 (domain 1 improved while training domain 2)
    # F_2   = max(R[1][1]) - R[2][1] = 0.50 - 0.55 = -0.05 (negative: no forgetting)
    # FWT_2 = R[1][2] - R[0][2] = 0.25 - 0.20 = 0.05
    assert transfer_metrics(R3, 2) == pytest.approx(
        {
            "average_performance": 0.575,
            "backward_transfer": 0.05,
            "forgetting": -0.05,
            "forward_transfer": 0.05,
        }
    )


def test_first_stage_conventions():
    # only A_1 = R[1][1] = 0.50 is measured; the rest are 0 by convention
    assert transfer_metrics(R3, 1) == {
        "average_performance": 0.50,
        "backward_transfer": 0.0,
        "forgetting": 0.0,
        "forward_transfer": 0.0,
    }


def test_later_rows_are_not_read():
    # the measures after stage 2 must not depend on row 3 (or a missing row 3)
    assert transfer_metrics(R3[:3], 2) == transfer_metrics(R3, 2)


def test_missing_entries_give_none_only_where_needed():
    r = [row[:] for row in R3]
    r[0][2] = None  # base on domain 3 not evaluated: only FWT_3 needs it
    r[2][0] = None  # domain 1 after stage 2 missing: forgetting_3 and A_2/BWT_2/F_2 need it
    m3 = transfer_metrics(r, 3)
    assert m3["average_performance"] == pytest.approx(0.55)
    assert m3["backward_transfer"] == pytest.approx(-0.075)
    assert m3["forgetting"] is None
    assert m3["forward_transfer"] is None
    m2 = transfer_metrics(r, 2)
    assert m2["average_performance"] is None and m2["backward_transfer"] is None
    assert m2["forgetting"] is None
    assert m2["forward_transfer"] == pytest.approx(0.05)
    # the k == 1 conventions need no entries at all
    assert transfer_metrics([[None, None], [None, None]], 1) == {
        "average_performance": None,
        "backward_transfer": 0.0,
        "forgetting": 0.0,
        "forward_transfer": 0.0,
    }


@pytest.mark.parametrize("k", [0, 4, 5])
def test_stage_out_of_range_is_an_error(k):
    with pytest.raises(ValueError, match="stage"):
        average_performance(R3, k)


def test_stage_without_its_row_is_an_error():
    with pytest.raises(ValueError, match="stage"):
        transfer_metrics(R3[:2], 2)
