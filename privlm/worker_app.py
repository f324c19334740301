"""`privlm worker`: the worker group's own command, with the embedded default model when no --model
is given (prepared once into the cache; the worker service itself always takes an explicit folder)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    import sys

    from services.inference.server import main as worker_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--model" or a.startswith("--model=") for a in argv) and not {"-h", "--help"} & set(argv):
        from privlm.model_prep import prepare

        argv = ["--model", str(prepare())] + argv
    return worker_main(argv)
