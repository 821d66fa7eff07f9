"""Facts computed from the model spec without building it."""

from __future__ import annotations

import pytest

from emrun.recipe.model import RSUNet, UpDown


def test_parameter_count_by_hand_for_two_levels():
    spec = RSUNet(widths=[2, 4], norm="none", kernel=(1, 1, 1), input_kernel=(1, 1, 1))
    conv = lambda a, b, k: a * b * k + b  # noqa: E731
    block = lambda a, w: conv(a, w, 1) + 3 * conv(w, w, 1)  # noqa: E731
    expected = (
        conv(1, 2, 1)  # input conv
        + block(2, 2) + block(2, 4)  # encoder
        + conv(4, 2, 1) + block(2, 2)  # decoder: 1x1x1 after upsampling, then a block
        + conv(2, 3, 1)  # one head with 3 channels
    )
    assert spec.parameter_count([3]) == expected


def test_norm_and_transposed_upsampling_add_their_parameters():
    plain = RSUNet(widths=[4, 8], norm="none")
    normed = RSUNet(widths=[4, 8], norm="batch")
    # each pre-activated conv adds 2 per input channel; plus the final norm on w0
    # level 0 block: 4 convs on 4 channels, level 1: 1 on 4 + 3 on 8, decoder block: 4 on 4
    assert normed.parameter_count([1]) - plain.parameter_count([1]) == 2 * (
        4 * 4 + (4 + 3 * 8) + 4 * 4 + 4)
    transposed = RSUNet(widths=[4, 8], norm="none", upsample="transpose")
    assert transposed.parameter_count([1]) - plain.parameter_count([1]) == 8 * 8 * 4 + 8


def test_divisor_follows_downsampling():
    assert RSUNet(widths=[8, 16, 32, 64]).divisor() == (1, 8, 8)
    assert RSUNet(widths=[8, 16, 32], downsample=[(2, 2, 2), (1, 2, 2)]).divisor() == (2, 4, 4)
    assert UpDown(widths=[8, 16]).divisor() == (1, 4, 4)


def test_downsample_length_must_match_levels():
    with pytest.raises(ValueError, match="one factor per level"):
        RSUNet(widths=[8, 16, 32], downsample=[(1, 2, 2)])
