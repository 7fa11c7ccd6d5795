"""``fade-sglang`` console script: ``demo`` (fp16 vs fade side by side), ``quality`` (evaluation through
the compressed cache), ``fidelity`` (quantizer report)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

SUBCOMMANDS = {
    "demo": "start fp16 and fade SGLang servers under the same KV byte budget and compare them",
    "quality": "passkey / greedy match / NLL through the compressed cache vs fp16 and eviction (python -m fade_sglang.eval.quality)",
    "fidelity": "quantization error report of the KV formats (same as python -m fade_sglang.eval.fidelity)",
}


def _entry(command: str) -> Callable[[list[str]], int]:
    # Imported lazily: `fade-sglang --help` should not import torch.
    if command == "demo":
        from .eval.demo import main as demo_main

        return demo_main
    if command == "quality":
        from .eval.quality import main as quality_main

        return quality_main
    from .eval.fidelity import main as fidelity_main

    return fidelity_main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:  # each subcommand owns its flags (and its --help)
        return int(_entry(argv[0])(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="fade-sglang", description="Tiered-precision KV cache for SGLang.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    parser.parse_args(argv or ["--help"])  # prints usage / help, or an error for unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
