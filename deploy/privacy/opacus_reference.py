#!/usr/bin/env python3
"""Reference (epsilon, order) values from Opacus's RDP accountant, for the fixtures that
common/engine/tests/accountant_against_opacus.rs checks Flotilla's accountant against.

Opacus's accountant math lives in opacus/accountants/analysis/rdp.py and needs only numpy and scipy;
importing the `opacus` package would import PyTorch, so this script loads that one file from an
unpacked Opacus wheel:

    python3 -m venv /tmp/opacus-venv && /tmp/opacus-venv/bin/pip install numpy scipy
    pip download --no-deps opacus==1.6.0 -d /tmp/opacus && (cd /tmp/opacus && unzip -o -q opacus-1.6.0-py3-none-any.whl)
    /tmp/opacus-venv/bin/python deploy/privacy/opacus_reference.py --opacus /tmp/opacus \
        > common/engine/tests/fixtures/opacus_rdp.csv

Orders: Opacus's default alphas (RDPAccountant.DEFAULT_ALPHAS), the same as
flotilla_engine::accountant::default_orders.
"""
import argparse
import importlib.util
import pathlib
import warnings

NOISE_MULTIPLIERS = [0.5, 0.8, 1.0, 2.0, 4.0]
SAMPLING_RATES = [0.01, 0.05, 0.25, 1.0]
ROUNDS = [1, 10, 100, 1000]
DELTAS = [1e-5, 1e-3]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opacus", required=True, help="directory holding an unpacked opacus wheel")
    args = parser.parse_args()
    path = pathlib.Path(args.opacus) / "opacus" / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("opacus_rdp", path)
    rdp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rdp)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    warnings.simplefilter("ignore")  # "optimal order is the largest alpha": expected for tiny epsilons
    print("noise_multiplier,sampling_rate,rounds,delta,epsilon,order")
    for sigma in NOISE_MULTIPLIERS:
        for q in SAMPLING_RATES:
            for rounds in ROUNDS:
                values = rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=orders)
                for delta in DELTAS:
                    eps, order = rdp.get_privacy_spent(orders=orders, rdp=values, delta=delta)
                    print(f"{sigma},{q},{rounds},{delta},{float(eps)!r},{float(order)!r}")


if __name__ == "__main__":
    main()
