"""README.md is assembled from docs/: the header (docs/_header.md) then one section per area, so each area's text
has one source. Run `make readme` after editing a page under docs/."""
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ORDER = ["pipeline", "data_gen", "foundation", "multimodal", "training", "stages", "adapters", "reliability"]


def section(name: str) -> str:
    lines = (DOCS / f"{name}.md").read_text(encoding="utf-8").strip().splitlines()
    if lines and lines[0].startswith("# "):  # a page titled with '#' becomes a '##' section of the README
        in_code = False
        for i, line in enumerate(lines):
            if line.startswith("```"):
                in_code = not in_code
            elif not in_code and re.match(r"#+ ", line):
                lines[i] = "#" + line
    return "\n".join(lines) + f"\n\n*(source: `docs/{name}.md`)*\n"


def main() -> None:
    parts = [(DOCS / "_header.md").read_text(encoding="utf-8").rstrip() + "\n"]
    parts += [section(name) for name in ORDER]
    (DOCS.parent / "README.md").write_text("\n".join(parts), encoding="utf-8")


if __name__ == "__main__":
    main()
