"""kvxfer.tables: what a person reads in the demo, plan, bench and soak tables."""

from kvxfer.tables import format_table


def test_numbers_right_aligned_text_left_aligned_with_separators():
    lines = format_table(["name", "bytes", "ms"], [["a", 1234567, 0.5], ["longer name", 8, 2500.0]]).splitlines()
    header, _rule, first, second = lines
    assert header.split() == ["name", "bytes", "ms"]
    assert first.startswith("a ") and second.startswith("longer name")
    assert "1,234,567" in first and "2,500" in second and "0.500" in first
    # right-aligned: the numbers of a column end where the column's header ends
    for column, a, b in (("bytes", "1,234,567", "8"), ("ms", "0.500", "2,500")):
        end = header.index(column) + len(column)
        assert first.index(a) + len(a) == second.index(b) + len(b) == end


def test_a_mixed_column_is_text_and_nothing_is_coloured():
    text = format_table(["value"], [[1], ["n/a"], [True]])
    assert "\x1b[" not in text
    assert [line.rstrip() for line in text.splitlines()[2:]] == ["1", "n/a", "True"]
