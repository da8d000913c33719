"""``python -m kncore.experiments NAME TARGET --out DIR [--model M] [--set key=value ...]``

Runs one experiment of :mod:`kncore.experiments` (``localise``,
``kn_edit_effects``, ``edit_eval``) and prints where its tables are. Option
values are JSON (``--set limit=50 --set layers=[10,11]``), else strings
(``--set kns=runs/loc``).

Two doors, one pipeline: ``kncore localise`` is the corpus run (any fact-bag
file, resumable, sharded under torchrun, with suppress/enhance effects);
``python -m kncore.experiments localise`` is the paper's per-task experiment
(BLiMP classes and PARAREL relations, the paper's figures beside them). Both
build their rows, R1^2, coarse sets and edit cases with :mod:`kncore.pipeline`,
and write its tables with its column names (docs/results.md says why both stay).

    python -m kncore.experiments localise blimp:determiner_noun_agreement_2,pararel:P101 --out runs/loc --set limit=50
    python -m kncore.experiments kn_edit_effects blimp:determiner_noun_agreement_2 --out runs/eff --set kns=runs/loc
    python -m kncore.experiments edit_eval counterfact --out runs/rome --set editor=rome --set limit=20
"""
from __future__ import annotations

import argparse
import json
import sys

from ..lm import InputError


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv=None) -> int:
    from . import EXPERIMENTS, run

    ap = argparse.ArgumentParser(prog="python -m kncore.experiments", description="Run one experiment of kncore.experiments.",
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"one of {', '.join(EXPERIMENTS)}")
    ap.add_argument("target", help="task(s) (blimp:<paradigm>, pararel:<relation>, comma-separated) or data set")
    ap.add_argument("--out", required=True, help="run directory (resumed when it exists)")
    ap.add_argument("--model", default="smollm2-135m", help="model name for kncore.load (default smollm2-135m)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an option of the experiment")
    args = ap.parse_args(argv)
    opts = {}
    for kv in args.set:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            ap.error(f"--set needs KEY=VALUE, got {kv!r}")
        opts[k.strip()] = _value(v)
    try:
        res = run(args.name, args.model, args.target, args.out, **opts)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TypeError as e:
        if "unexpected keyword" in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    print(f"{args.name}: tables in {args.out}/results ({', '.join(res)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
