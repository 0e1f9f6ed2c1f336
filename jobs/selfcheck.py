"""``maskray selfcheck``: the compiled RoI operators against torchvision, on random inputs.

A quick answer to "is this build right on this machine?": forward and gradient of
roi_align (aligned on and off) and roi_pool, contiguous and channels_last, on every device
with kernels, compared with torchvision.ops. Exits non-zero on any mismatch.
"""

import argparse
import time

TOLERANCE = 1e-4  # float32; the kernels do torchvision's arithmetic, so differences are rounding


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features and boxes")
    parser.add_argument("--boxes", type=int, default=64, help="number of boxes")


def _inputs(seed: int, count: int, device):
    import torch

    generator = torch.Generator().manual_seed(seed)
    feature = torch.randn(2, 32, 48, 64, generator=generator)
    # Image coordinates at stride 4, some boxes reaching past the map's edge.
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([256.0, 192.0])
    wh = torch.rand(count, 2, generator=generator) * 160 + 1
    index = torch.randint(0, 2, (count, 1), generator=generator).float()
    rois = torch.cat([index, xy, xy + wh], dim=1)
    return feature.to(device), rois.to(device)


def _compare(ours, theirs, feature, layout) -> tuple[float, float]:
    """Max abs difference of the outputs and of the input gradients."""
    import torch

    x_ours = feature.clone(memory_format=layout).requires_grad_()
    x_theirs = feature.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    grad = torch.randn_like(out_theirs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    return (
        (out_ours - out_theirs).abs().max().item(),
        (x_ours.grad - x_theirs.grad).abs().max().item(),
    )


def run(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    import model.ops as ops

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and ops.has_cuda_kernels():
        devices.append(torch.device("cuda"))
    print(f"maskray selfcheck: torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads, devices {[d.type for d in devices]}")
    print(f"{'device':<7}{'op':<28}{'layout':<15}{'max |Δ| out':>12}{'max |Δ| grad':>14}{'ms':>8}  result")
    failures = 0
    for device in devices:
        feature, rois = _inputs(args.seed, args.boxes, device)
        cases = {
            "roi_align 7x7 aligned": (
                lambda x: ops.roi_align(x, rois, 7, 0.25, 2, True),
                lambda x: torchvision.ops.roi_align(x, rois, 7, 0.25, 2, True),
            ),
            "roi_align 14x14 adaptive": (
                lambda x: ops.roi_align(x, rois, 14, 0.25, -1, False),
                lambda x: torchvision.ops.roi_align(x, rois, 14, 0.25, -1, False),
            ),
            "roi_pool 7x7": (
                lambda x: ops.roi_pool(x, rois, 7, 0.25),
                lambda x: torchvision.ops.roi_pool(x, rois, 7, 0.25),
            ),
        }
        for name, (ours, theirs) in cases.items():
            for layout in (torch.contiguous_format, torch.channels_last):
                start = time.perf_counter()
                out_diff, grad_diff = _compare(ours, theirs, feature, layout)
                elapsed = (time.perf_counter() - start) * 1e3
                ok = out_diff <= TOLERANCE and grad_diff <= TOLERANCE
                failures += not ok
                layout_name = "channels_last" if layout == torch.channels_last else "contiguous"
                print(f"{device.type:<7}{name:<28}{layout_name:<15}{out_diff:>12.2e}{grad_diff:>14.2e}"
                      f"{elapsed:>8.1f}  {'ok' if ok else 'MISMATCH'}")
    print("all operators agree with torchvision" if not failures else f"{failures} case(s) disagree with torchvision")
    return 1 if failures else 0
