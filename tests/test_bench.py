"""The benchmark's table: every row present, ratios oriented so that > 1 means qwen2vl is better."""

from qwen2vl.bench import ROWS, table


def test_table_ratios():
    ours = {key: 2.0 for key, _, _ in ROWS}
    ref = {key: 4.0 for key, _, _ in ROWS}
    text = table(ours, ref, 2, "ours", "theirs")
    lines = text.splitlines()
    assert lines[0] == "| work | theirs | ours | ratio |"
    for key, name, higher_better in ROWS:
        row = next(l for l in lines if l.startswith(f"| {name} |"))
        assert row.endswith("| 0.50x |" if higher_better else "| 2.00x |"), row  # faster/smaller is > 1
    assert table(ours, None, 2, "ours", "theirs").splitlines()[0] == "| work | ours |"
