"""RoIAlign / RoIPool: maskray's compiled ops against torchvision's, same inputs, one run.

The workload is Mask R-CNN's: a 2x256x200x272 feature (stride 4 of two 800x1088 images),
512 boxes, 7x7 (box head) and 14x14 (mask head) outputs, sampling_ratio 2, aligned=True.
Box sides are log-uniform over a range: `proposals` (16-512 px, the spread of RPN proposals)
or `p2` (16-112 px, the boxes an FPN actually pools from this stride-4 level). For each torch
thread count, each op and each direction it prints the median time of several runs and the
ratio torchvision / maskray (above 1: maskray is faster).

    python bench/roi_ops.py                  # proposal-sized boxes, contiguous feature
    python bench/roi_ops.py --boxes p2       # P2-sized boxes
    python bench/roi_ops.py --channels-last  # both ops given a channels_last feature
    python bench/roi_ops.py --repeats 3      # quicker
"""

import argparse
import platform
import statistics
import time

import torch
import torchvision

import maskray.model.ops as ours

BOX_SIDES = {"proposals": (16.0, 512.0), "p2": (16.0, 112.0)}  # px, log-uniform


def make_inputs(seed: int = 0, channels_last: bool = False, boxes: str = "proposals"):
    generator = torch.Generator().manual_seed(seed)
    feature = torch.randn(2, 256, 200, 272, generator=generator)
    if channels_last:
        feature = feature.contiguous(memory_format=torch.channels_last)
    image_h, image_w = 800.0, 1088.0
    count = 512
    low, high = (torch.log(torch.tensor(side)).item() for side in BOX_SIDES[boxes])
    sides = torch.exp(torch.empty(count, 2).uniform_(low, high, generator=generator))
    centres = torch.rand(count, 2, generator=generator) * torch.tensor([image_w, image_h])
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_h)
    batch_index = torch.randint(0, 2, (count, 1), generator=generator).float()
    rois = torch.cat([batch_index, boxes], dim=1)
    return feature, rois


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocation, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(feature, rois, output_size):
    """(name, torchvision fn, maskray fn) for forward and forward+backward of both ops."""
    spatial_scale, sampling_ratio = 0.25, 2
    x = feature.detach().requires_grad_()

    def align(impl):
        return lambda inp: impl(inp, rois, output_size, spatial_scale, sampling_ratio, True)

    def pool(impl):
        return lambda inp: impl(inp, rois, output_size, spatial_scale)

    def forward(op):
        def run():
            with torch.no_grad():
                op(feature)
        return run

    def forward_backward(op):
        def run():
            x.grad = None
            out = op(x)
            out.backward(torch.ones_like(out))
        return run

    tv_align, our_align = align(torchvision.ops.roi_align), align(ours.roi_align)
    tv_pool, our_pool = pool(torchvision.ops.roi_pool), pool(ours.roi_pool)
    return [
        ("roi_align forward", forward(tv_align), forward(our_align)),
        ("roi_align fwd+bwd", forward_backward(tv_align), forward_backward(our_align)),
        ("roi_pool forward", forward(tv_pool), forward(our_pool)),
        ("roi_pool fwd+bwd", forward_backward(tv_pool), forward_backward(our_pool)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (median reported)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14], help="output sizes")
    parser.add_argument("--channels-last", action="store_true", help="give both ops a channels_last feature")
    parser.add_argument("--boxes", choices=sorted(BOX_SIDES), default="proposals", help="box sizes (see above)")
    args = parser.parse_args()

    feature, rois = make_inputs(channels_last=args.channels_last, boxes=args.boxes)
    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}")
    low, high = BOX_SIDES[args.boxes]
    print(f"feature {tuple(feature.shape)} {layout}, {len(rois)} {args.boxes} boxes ({low:.0f}-{high:.0f} px), "
          f"sampling_ratio 2, aligned=True, median of {args.repeats}")
    print(f"{'case':<20} {'out':>5} {'threads':>7} {'torchvision ms':>15} {'maskray ms':>11} {'ratio':>7}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            for name, theirs, mine in cases(feature, rois, size):
                t_theirs = median_seconds(theirs, args.repeats)
                t_mine = median_seconds(mine, args.repeats)
                print(f"{name:<20} {size:>2}x{size:<2} {threads:>7} {t_theirs * 1e3:>15.1f} {t_mine * 1e3:>11.1f} "
                      f"{t_theirs / t_mine:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
