"""The benchmark's table: every row and engine present, ratios oriented so that > 1 means qwen2vl is better, and
items an engine cannot measure shown as n/a."""

from qwen2vl.bench import ROWS, table


def test_table_ratios():
    ours = {key: 2.0 for key, _, _ in ROWS}
    ref = {key: 4.0 for key, _, _ in ROWS}
    peer = {key: 1.0 for key, _, _ in ROWS if key != "vision_448_s"}
    lines = table([("ours", ours), ("theirs", ref), ("peer", peer)], 2).splitlines()
    assert lines[0] == "| work | ours | theirs | peer | vs theirs | vs peer |"
    for key, name, higher_better in ROWS:
        row = next(l for l in lines if l.startswith(f"| {name} |")).split(" | ")
        assert row[4] == ("0.50x" if higher_better else "2.00x"), row  # faster/smaller is > 1
        if key == "vision_448_s":
            assert row[3] == "n/a" and row[5] == "n/a |"
        else:
            assert row[5] == ("2.00x |" if higher_better else "0.50x |"), row
    assert table([("ours", ours)], 2).splitlines()[0] == "| work | ours |"
