"""Hand-written mutants of the FOD recipe's constants and conventions (Python), run by
`tools/mutants/run_cpp_mutants.py --set recipe`. The first five passed the whole suite before issue 16
(tests/fod/test_fod_pins.py kills them now); the rest are the other plausible slips each pin guards against.
mutmut (tools/mutants/run_py_mutants.sh) generates many more, mechanically; these are the ones that change
published numbers. Same format as cpp_mutants.py; none needs a build.
"""
from cpp_mutants import Mutant

DATA, MODULE, TRAIN, METRICS, MODEL, BACKBONE, CLI = ("fod/data.py", "fod_kernels/module.py", "fod/train.py",
                                                      "fod/metrics.py", "fod/model.py", "fod/backbone.py", "fod/cli.py")
G = ("fod", "pins")
GM = ("api", "fod", "pins")  # fod_kernels/module.py: the operator-level API tests too

MUTANTS = [
    # the survivors
    Mutant("mask-threshold-up", DATA, "np.asarray(im) > 127)", "np.asarray(im) > 160)", "none", G,
           "mask threshold moved up (grey 128..160 no longer a defect)"),
    Mutant("mask-threshold-down", DATA, "np.asarray(im) > 127)", "np.asarray(im) > 100)", "none", G,
           "mask threshold moved down (grey 101..127 become defects: still not the intended > 0)"),
    Mutant("sigma-sigmoid-z", MODULE, "torch.sigmoid(5.0 * z)", "torch.sigmoid(z)", "none", GM,
           "sigma = 3 ** (sigmoid(z) + 1e-5) - 1"),
    Mutant("align-corners-false", TRAIN, 'mode="bilinear", align_corners=True', 'mode="bilinear", align_corners=False',
           "none", G, "anomaly-map upsampling with align_corners=False"),
    Mutant("gauss-sigma-2", METRICS, "def image_scores(maps: np.ndarray, sigma: float = 4.0)",
           "def image_scores(maps: np.ndarray, sigma: float = 2.0)", "none", G, "image score filter sigma 4 -> 2"),
    # more plausible slips
    Mutant("gauss-sigma-2-eval", METRICS, "defects, *, sigma: float = 4.0,", "defects, *, sigma: float = 2.0,", "none",
           G, "evaluate_maps' image-score sigma 4 -> 2"),
    Mutant("image-score-mean", METRICS, "sigma=sigma).max() for m in maps", "sigma=sigma).mean() for m in maps",
           "none", G, "image score = mean of the filtered map instead of its max"),
    Mutant("sigma-no-offset", MODULE, "torch.sigmoid(5.0 * z) + 1e-5", "torch.sigmoid(5.0 * z)", "none", GM,
           "sigma's +1e-5 dropped (sigma can reach 0)"),
    Mutant("sigma-base-2", MODULE, "torch.pow(3.0, ", "torch.pow(2.0, ", "none", GM, "sigma base 3 -> 2"),
    Mutant("sigma-layout", MODULE, ".view(B, L, self.n_heads, 2).transpose(1, 2)",
           ".view(B, L, 2, self.n_heads).permute(0, 3, 1, 2)", "none", GM,
           "sigma channels read as (axis, head) instead of (head, axis)"),
    Mutant("mask16-threshold", DATA, "(np.asarray(im) > 0)", "(np.asarray(im) > 1)", "none", G,
           "16-bit masks: value 1 no longer a defect"),
    Mutant("maps-nearest", TRAIN, 'mode="bilinear", align_corners=True', 'mode="nearest"', "none", G,
           "anomaly maps upsampled with nearest neighbour"),
    Mutant("maps-sum-levels", TRAIN, "return torch.stack(maps).mean(0)", "return torch.stack(maps).sum(0)", "none", G,
           "anomaly maps summed over levels instead of averaged"),
    Mutant("score-softmax-sign", MODEL, "att = torch.softmax(-k, dim=-1)", "att = torch.softmax(k, dim=-1)", "none", G,
           "inter score: softmax of +K instead of -K"),
    Mutant("score-softmax-batch", MODEL, "att = torch.softmax(-k, dim=-1)", "att = torch.softmax(-k, dim=0)", "none",
           G, "inter score: softmax over the batch instead of the tokens"),
    Mutant("score-min", MODEL, "inter_score = att.max(dim=-1, keepdim=True).values - att",
           "inter_score = att - att.min(dim=-1, keepdim=True).values", "none", G, "inter score: value - min"),
    Mutant("score-heads-sum", MODEL, ".mean(dim=(0, 2))  # mean over layers and heads",
           ".sum(dim=2).mean(dim=0)  # mean over layers and heads", "none", G, "K_inter summed over heads"),
    Mutant("score-rec-no-cos", MODEL, "rec = torch.mean((out - x) ** 2, dim=-1) + 1 - torch.cosine_similarity(out, x, dim=-1)",
           "rec = torch.mean((out - x) ** 2, dim=-1)", "none", G, "token rec score without 1 - cos"),
    Mutant("loss-rec-once", MODEL, "loss = (2 * rec + ", "loss = (rec + ", "none", G, "rec counted once"),
    Mutant("loss-l1-l2-swap", MODEL, "- lambda1 * ki_a - lambda2 * ei + lambda1 * ke_a + lambda2 * ee)",
           "- lambda1 * ki_a - lambda1 * ei + lambda1 * ke_a + lambda2 * ee)", "none", G,
           "entropy of the intra branch weighted by lambda1"),
    Mutant("loss-prior-sign", MODEL, "loss = (2 * rec + lambda1 * ki_p - lambda1 * ke_p",
           "loss = (2 * rec + lambda1 * ki_p + lambda1 * ke_p", "none", G, "inter prior term's sign"),
    Mutant("loss-default-l2", MODEL, "lambda1: float = 0.5, lambda2: float = 0.5):",
           "lambda1: float = 0.5, lambda2: float = 1.0):", "none", G, "fod_loss default lambda2 0.5 -> 1"),
    Mutant("config-lr", TRAIN, "    lr: float = 1e-4\n", "    lr: float = 1e-3\n", "none", G, "default lr 1e-4 -> 1e-3"),
    Mutant("config-heads", TRAIN, "    n_heads: int = 8\n", "    n_heads: int = 4\n", "none", G, "default 8 -> 4 heads"),
    Mutant("cli-lambda1", CLI, 'g.add_argument("--lambda1", type=float, default=0.5,',
           'g.add_argument("--lambda1", type=float, default=1.0,', "none", G, "CLI default lambda1 0.5 -> 1"),
    Mutant("d-model-swap", MODEL, "return 256 if L >= 1024 else 512", "return 512 if L >= 1024 else 256", "none", G,
           "d_model per level swapped"),
    Mutant("memory-cached-axis", TRAIN, "return [f.mean(0) for f in cached]",
           "return [f[0] for f in cached]", "none", G,
           "cached reference memory = the first training image's features"),
    Mutant("memory-count", TRAIN, "n += toks[0].shape[0]", "n += len(batch)", "none", G,
           "uncached reference memory divides by the wrong count"),
    Mutant("norm-255", DATA, "np.float32) / 255.0 - IMAGENET_MEAN", "np.float32) / 256.0 - IMAGENET_MEAN", "none", G,
           "normalisation x / 256"),
    Mutant("norm-mean-bgr", DATA, "IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)",
           "IMAGENET_MEAN = np.array([0.406, 0.456, 0.485], np.float32)", "none", G, "ImageNet mean in BGR order"),
    Mutant("avgpool-exclude-pad", BACKBONE, "self.pool = nn.AvgPool2d(3, 1, 1)",
           "self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)", "none", G,
           "AvgPool2d without the zero padding in the count"),
    Mutant("avgpool-5", BACKBONE, "self.pool = nn.AvgPool2d(3, 1, 1)", "self.pool = nn.AvgPool2d(5, 1, 2)", "none", G,
           "AvgPool2d(5, 1, 2)"),
]
