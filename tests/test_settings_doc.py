"""Every setting is documented: a row of README's settings table per `Settings` field, so a
new knob cannot ship without saying what it does."""

from __future__ import annotations

from pathlib import Path

from myllm.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    rows = {line.split("|")[1].strip().strip("`") for line in README.read_text().splitlines() if line.startswith("| `MYLLM_")}
    fields = {f"MYLLM_{name.upper()}" for name in Settings.model_fields}
    assert fields <= rows, f"settings missing from README's table: {sorted(fields - rows)}"
    for name, field in Settings.model_fields.items():
        assert field.description, f"MYLLM_{name.upper()} has no description"
