"""The emoji measure's choices of the bundle's defaults (export/emoji_measure.py)."""

from export import emoji_measure as M


def row(ratio, kid, **extra):
    return {"ratio_to_real": ratio, "kid_x1000": kid, **extra}


def test_the_sampler_is_the_lowest_kid_among_those_meeting_the_bar_else_among_all():
    rows = [row(0.9, 700, s="a"), row(0.86, 650, s="b"), row(0.5, 100, s="c")]
    assert M.choose(rows)["s"] == "b"
    assert M.choose([row(0.5, 300, s="a"), row(0.6, 200, s="b")])["s"] == "b"


def test_guidance_meeting_the_bar_takes_the_lowest_kid_else_the_closest_to_the_bar():
    rows = [row(0.50, 600, guidance=0.0), row(0.86, 900, guidance=3.0), row(0.88, 950, guidance=5.0)]
    assert M.choose_guidance(rows)["guidance"] == 3.0
    # v4's rows: none quite meets the bar; the class asked for wins over KID
    v4 = [row(0.495, 600, guidance=0.0), row(0.812, 843, guidance=3.0), row(0.8498, 919, guidance=5.0),
          row(0.777, 966, guidance=8.0)]
    assert M.choose_guidance(v4)["guidance"] == 5.0
