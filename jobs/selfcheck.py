"""``maskray selfcheck``: is this build of the compiled RoI operators right on this machine?

Compares them with torchvision.ops on random inputs (maskray.model.ops.selfcheck) and prints a table;
exits non-zero on any mismatch.
"""

import argparse

from maskray.jobs.cli import reports_user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features and boxes")
    parser.add_argument("--boxes", type=int, default=64, help="number of boxes")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    from maskray.model.ops.selfcheck import devices, run_checks

    print(f"maskray selfcheck: torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads, devices {[d.type for d in devices()]}")
    print(f"{'device':<7}{'op':<28}{'layout':<15}{'max |Δ| out':>12}{'max |Δ| grad':>14}  result")
    failures = 0
    for check in run_checks(args.seed, args.boxes):
        failures += not check.ok
        print(f"{check.device:<7}{check.case:<28}{check.layout:<15}{check.output_difference:>12.2e}"
              f"{check.gradient_difference:>14.2e}  {'ok' if check.ok else 'MISMATCH'}")
    print("all operators agree with torchvision" if not failures else f"{failures} case(s) disagree with torchvision")
    return 1 if failures else 0
