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


def test_long_table_ratios():
    """`bench --long`: per length, decode ratios (> 1: qwen2vl decodes faster), prefill ratios (> 1: it prefills in
    less time), its decode against its shortest prompt's and against the short-prompt decodes around it, and a
    follow-up's time to first token against the prefill."""
    from qwen2vl.bench.long import table as long_table

    ours = {1: {"prefill_s": 0.1, "decode_tps": 20.0, "peak_rss_gb": 2.5, "followup_ttft_s": 0.05},
            100: {"prefill_s": 10.0, "decode_tps": 15.0, "peak_rss_gb": 2.6, "followup_ttft_s": 0.5,
                  "short_decode_tps": 25.0}}
    peer = {1: {"prefill_s": 0.2, "decode_tps": 10.0, "peak_rss_gb": 1.5}, 100: {"prefill_s": 5.0, "decode_tps": 30.0}}
    lines = long_table({"ours": ours, "peer": peer}, [1, 100], 64, 2).splitlines()
    row = dict(zip(lines[0].strip("| ").split(" | "), lines[3].strip("| ").split(" | ")))
    assert row["input tokens"] == "100" and row["ours prefill s (tok/s)"] == "10.0 (10.0)"
    assert row["decode vs peer"] == "0.50x" and row["prefill vs peer"] == "0.50x"
    assert row["qwen2vl decode vs its shortest"] == "0.75x" and row["peer peak RSS GiB"] == "n/a"
    assert row["qwen2vl follow-up TTFT s (vs prefill)"] == "0.50 (0.050x)"
    assert row["qwen2vl decode vs its short prompt, paired"] == "0.60x (short 25.00)"
