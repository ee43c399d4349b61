"""Rewrite the defaults table of docs/methods.md from the registry (``make docs-defaults``)."""

from pathlib import Path

import hardneg

HEADER = "| loss | hyper-parameter | default |"


def main() -> None:
    path = Path(__file__).with_name("methods.md")
    text = path.read_text()
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    rows = [HEADER, "|---|---|---|"]
    for name in hardneg.list_losses():
        for key, value in hardneg.loss_hparams(name).items():
            rows.append(f"| `{name}` | `{key}` | `{value!r}` |")
    path.write_text(text[:start] + "\n".join(rows) + text[end:])


if __name__ == "__main__":
    main()
