"""benchmarks/quantizer_fidelity.py --only: one test's section replaces its own, the rest is kept."""

import pytest

from benchmarks.quantizer_fidelity import merged_sections, section_key

EARLIER = """# Quantizer fidelity

- Data: the earlier run's

## Patch test, K = 1024

Run: earlier

| patch rows |

## Tokenizer: `tiny` preset, 400 Adam steps

Run: earlier

| tokenizer rows |
"""


def test_section_key_drops_the_parameters():
    assert section_key("## Large codebooks (200 steps, lr 0.01)\n\nrows") == "Large codebooks"
    assert section_key("## Tokenizer: `tiny` preset, 400 steps") == "Tokenizer"
    assert section_key("## Patch test, K = 1024") == "Patch test"


def test_only_run_replaces_its_section_and_keeps_the_others_in_order():
    latest = "# Quantizer fidelity\n\n- Data: the latest run's\n\n## Large codebooks (10 steps)\n\nRun: latest\n\n| large |\n"
    merged = merged_sections(EARLIER, latest)
    assert merged.index("## Patch test") < merged.index("## Large codebooks") < merged.index("## Tokenizer")
    assert "- Data: the earlier run's" in merged and "the latest run's" not in merged  # header of the kept sections
    assert merged.count("Run: earlier") == 2 and "| large |" in merged

    rerun = "# Quantizer fidelity\n\n## Patch test, K = 1024\n\nRun: latest\n\n| new patch rows |\n"
    again = merged_sections(merged, rerun)
    assert "| patch rows |" not in again and "| new patch rows |" in again
    assert again.count("## ") == 3 and again.index("## Patch test") < again.index("## Large codebooks")


def test_rows_run_replaces_rows_of_the_same_name_and_adds_new_ones_after_the_last():
    earlier = merged_sections(EARLIER, EARLIER.replace("| patch rows |", "| h | h |\n| --- | --- |\n| a | 1 |\n| b | 2 |"))
    latest = (EARLIER.split("\n## ")[0] + "\n\n## Patch test, K = 1024\n\nRun: latest\n\n"
              "| h | h |\n| --- | --- |\n| b | 20 |\n| c | 30 |\n")
    merged = merged_sections(earlier, latest, rows_only=True)
    patch = merged[merged.index("## Patch test"):merged.index("## Tokenizer")]
    assert "| a | 1 |\n| b | 20 |\n| c | 30 |" in patch  # b replaced in place, c after the last row
    assert "| b | 2 |" not in patch and patch.count("| h | h |") == 1
    assert "Run: earlier" in patch and "Re-measured since: b, c. Run: latest" in patch
    assert "| tokenizer rows |" in merged


def test_rows_run_refuses_other_settings_and_repeated_names_and_skips_empty_sections():
    earlier = EARLIER.replace("| patch rows |", "| h | h |\n| --- | --- |\n| a | 1 |")
    table = "| h | h |\n| --- | --- |\n"
    other_header = earlier.replace("the earlier run's", "another pool")
    with pytest.raises(SystemExit, match="data or training settings differ"):
        merged_sections(earlier, other_header.replace("| a | 1 |", "| a | 2 |"), rows_only=True)
    other_steps = earlier.replace("## Patch test, K = 1024", "## Patch test, K = 2048").replace("| a | 1 |", "| a | 2 |")
    with pytest.raises(SystemExit, match="rerun the whole section"):
        merged_sections(earlier, other_steps, rows_only=True)
    repeated = earlier.replace("| a | 1 |", "| a | 2 |\n| a | 3 |")
    with pytest.raises(SystemExit, match="name more than one row"):
        merged_sections(earlier, repeated, rows_only=True)
    header = EARLIER.split("\n## ")[0]
    no_rows = header + "\n\n## Patch test, K = 1024\n\nRun: latest\n\n" + table
    assert merged_sections(earlier, no_rows, rows_only=True) == merged_sections(earlier, earlier)
