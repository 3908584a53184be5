# Experiment script (2026-12-06): gave the adversarially trained super-resolution adapter (docs/results.md, "A
# distribution term for one step") the served entry's fidelity module and sampler, to measure it as it would be served.
"""Copy a super-resolution entry with another entry's fidelity module (and served sampler), for cdd-eval.

    python experiments/graft_fidelity.py --entry runs/onestep/sr-adv2/entry \
        --module-from adapters/embedded/zoo/super-resolution --out runs/onestep2/adv-entry
    python experiments/graft_fidelity.py --entry adapters/embedded/zoo/super-resolution \
        --module-from adapters/embedded/zoo/super-resolution --flat-guard 0.02 --out runs/guard/entry
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cdd.adapters.fidelity import FidelityNet
from cdd.adapters.zoo import add_fidelity, install_entry, load_fidelity, verify_entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, required=True, help="the super-resolution entry whose adapter is kept")
    p.add_argument("--module-from", type=Path, required=True, help="the entry whose fidelity module and sampler it takes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--flat-guard", type=float, default=None,
                   help="give the module this flat guard threshold (adapters/fidelity.py; default: the donor's)")
    args = p.parse_args()
    donor = verify_entry(args.module_from)
    net = load_fidelity(args.module_from, donor)
    if net is None:
        raise SystemExit(f"{args.module_from} has no fidelity module")
    if args.flat_guard is not None:
        guarded = FidelityNet.from_config({**net.config(), "flat_guard": args.flat_guard})
        guarded.load_state_dict(net.state_dict())
        net = guarded
    training = {**donor.fidelity["training"], "grafted_from": str(args.module_from)}
    with tempfile.TemporaryDirectory() as tmp:
        grafted = add_fidelity(args.entry, Path(tmp) / "entry", net, default=donor.fidelity["default"], training=training)
        # served with the donor's sampler, the one the module was trained on
        dest = install_entry(grafted, args.out.parent, name=args.out.name, sampler=donor.sampler)
    verify_entry(dest)
    print(f"{dest}: adapter of {args.entry}, fidelity module and sampler ({donor.sampler}) of {args.module_from}")


if __name__ == "__main__":
    main()
