"""One GAN run (task "gan"): a generator with the run's norm and a discriminator with
``settings["d_norm"]``, trained on real images, then scored by FID and KID against real images in
the InceptionV3 FID feature space.

Each generator step follows ``n_dis`` discriminator steps on fresh real batches (shuffled, not
augmented, scaled to [-1, 1]) and fresh noise; both networks use the run's optimizer with the
same hyper-parameters (StudioGAN's SNGAN and DCGAN recipes do). The generator that is scored and
drawn is the exponential moving average of the generator's weights where the budget asks for
one, else the generator itself, in eval mode (running statistics, as at test time in a
classifier). Images are quantized to uint8 like saved images before the feature network sees them.

A non-finite loss ends the run as ``diverged`` with what it measured before; a generator whose
samples have collapsed to (nearly) one image finishes and says so (``mode_collapsed`` = 1):
collapse is a result about the norm pair, not a failure of the run.

With a checkpoint path, the networks, the optimizers, the data stream's position, the random
state, the average and the rows are saved every ``checkpoint_every`` generator steps (atomically),
and a rerun resumes from the last save with the rows an uninterrupted run gives.
"""

from __future__ import annotations

import io
import math
import time
from collections import deque
from pathlib import Path

import torch

from normbench import gan_metrics
from normbench import metrics as M
from normbench.data import TensorLoader, load_dataset
from normbench.errors import NormbenchError
from normbench.estimate import Rates
from normbench.gan_models import GeneratorEMA, build_gan, d_loss, g_loss
from normbench.metrics import MetricRow
from normbench.models import parameter_count
from normbench.norms import norm_source_sha256
from normbench.runtime import synchronize
from normbench.suites import RunSpec
from runners.classify import Progress, RunResult, _load_checkpoint, _save_checkpoint
from runners.probe import TrainStream, _rng_state, _row_tuple, _set_rng_state

#: Real images scaled from uint8 to [-1, 1] (the generator's tanh range).
HALF = (0.5, 0.5, 0.5)
#: Seeds of the streams that must not follow the run's seed exactly: the real-data order, the
#: fixed noise of the sample grid and the noise of the generated images that are scored.
DATA_STREAM, GRID_NOISE, SCORE_NOISE = 1, 2, 3
#: Generator steps whose losses are averaged into the run's final d_loss and g_loss.
LOSS_WINDOW = 100
#: Images per batch of the generator and of the feature network when scoring.
SCORE_BATCH = 100


def real_count(spec: RunSpec, split_size: int) -> int:
    """Real images the scores use: the budget's ``fid_real_samples``, 0 meaning the split."""
    n = spec.settings["fid_real_samples"]
    if n > split_size:
        raise NormbenchError(
            f"fid_real_samples is {n}, but the {spec.dataset} {spec.settings['fid_real_split']} "
            f"split has {split_size} images"
        )
    return n or split_size


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator outputs in [-1, 1] as the uint8 pixels a saved image would hold."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def generate(
    generator: torch.nn.Module, count: int, z_dim: int, seed: int, device: torch.device
) -> torch.Tensor:
    """``count`` uint8 images (N,3,H,W) on the CPU from seeded noise, in eval mode."""
    was_training = generator.training
    generator.eval()
    noise = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, count, SCORE_BATCH):
        z = torch.randn(min(SCORE_BATCH, count - start), z_dim, generator=noise)
        out.append(to_uint8(generator(z.to(device))).cpu())
    generator.train(was_training)
    return torch.cat(out)


def sample_grid_png(images: torch.Tensor) -> bytes:
    """A square-ish grid of uint8 images as PNG bytes."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=max(1, int(math.sqrt(len(images)))), padding=2, pad_value=255)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def run(
    spec: RunSpec,
    *,
    device: torch.device,
    data_dir: str | Path | None = None,
    checkpoint: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Train ``spec``'s GAN, score it and draw its sample grid."""
    progress = progress or Progress()
    s = spec.settings
    wall_start = time.perf_counter()
    split = s["fid_real_split"]
    # Subsets use a fixed seed, not the run's, so every run of a budget sees the same examples.
    full_train = load_dataset(spec.dataset, "train", data_dir)
    train_set = full_train.subset(s["train_subset"], seed=0)
    split_size = len(
        full_train if split == "train" else load_dataset(spec.dataset, split, data_dir)
    )
    n_real = real_count(spec, split_size)
    # Prepared by the orchestrator (a confined worker may only read the cache); computed here
    # when the runner is called directly.
    real = gan_metrics.cached_real_features(spec.dataset, split, n_real)
    if real is None:
        real = gan_metrics.real_features(spec.dataset, split, n_real, data_dir, device=device)

    torch.manual_seed(spec.seed)
    generator, discriminator = build_gan(
        s["model"], spec.norm, s["d_norm"], z_dim=s["z_dim"], **s["model_args"]
    )
    generator.to(device)
    discriminator.to(device)
    opt_g = _optimizer(spec, generator)
    opt_d = _optimizer(spec, discriminator)
    ema = GeneratorEMA(generator, decay=s["ema"], start_step=s["ema_start"]) if s["ema"] else None
    stream = TrainStream(
        TensorLoader(
            train_set,
            s["batch_size"],
            device=device,
            train=True,
            generator=torch.Generator().manual_seed(spec.seed + DATA_STREAM),
            mean=HALF,
            std=HALF,
        )
    )

    step, rows, earlier_wall, train_seconds = 0, [], 0.0, 0.0
    losses: dict[str, deque] = {"d": deque(maxlen=LOSS_WINDOW), "g": deque(maxlen=LOSS_WINDOW)}
    state = _load_checkpoint(checkpoint, device) if checkpoint is not None else None
    resumed = state is not None and state.get("run_key") == spec.key
    if resumed:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        stream.restore(state["stream"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        _set_rng_state(state["rng"], device)
        step, earlier_wall = state["step"], state["wall_seconds"]
        train_seconds = state["train_seconds"]
        rows = [MetricRow(*r) for r in state["rows"]]
        losses = {k: deque(v, maxlen=LOSS_WINDOW) for k, v in state["losses"].items()}

    result = RunResult(status="finished")
    result.info = {
        "precision": "fp32",
        "d_norm": s["d_norm"],
        "feature_network": gan_metrics.FEATURE_NETWORK,
        "feature_network_sha256": gan_metrics.feature_network_sha256(),
        "data_source": train_set.source,
        "norm_source_sha256": norm_source_sha256(spec.norm),
        "d_norm_source_sha256": norm_source_sha256(s["d_norm"]),
    }
    if resumed:
        result.info["resumed_from_step"] = step
    network = gan_metrics.load_feature_network(device)
    progress.on_start(1, s["steps"])

    def scored() -> torch.nn.Module:
        return ema.module if ema is not None else generator

    generator.train()
    discriminator.train()
    while step < s["steps"]:
        started = time.perf_counter()
        try:
            d_value, g_value = _train_step(spec, generator, discriminator, opt_g, opt_d, stream)
        except FloatingPointError as err:
            result.status, result.diverged_step = "diverged", step
            result.reason = f"{err} at generator step {step}"
            break
        synchronize(device)
        train_seconds += time.perf_counter() - started
        losses["d"].append(d_value)
        losses["g"].append(g_value)
        step += 1
        if ema is not None:
            ema.update(step)
        progress.on_step(step)
        if s["fid_every"] and step % s["fid_every"] == 0 and step < s["steps"]:
            images = generate(scored(), s["fid_every_samples"], s["z_dim"], SCORE_NOISE, device)
            fake = gan_metrics.image_features(
                images, network, batch_size=SCORE_BATCH, device=device
            )
            fid = gan_metrics.fid_from_features(real, fake)
            rows.append(MetricRow(M.GAN_FID_PROGRESS, fid, split=split, step=step))
        if checkpoint is not None and step % s["checkpoint_every"] == 0 and step < s["steps"]:
            _save_checkpoint(
                checkpoint,
                {
                    "run_key": spec.key,
                    "step": step,
                    "generator": generator.state_dict(),
                    "discriminator": discriminator.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "ema": ema.module.state_dict() if ema is not None else {},
                    "stream": stream.state(),
                    "rng": _rng_state(device),
                    "rows": [_row_tuple(r) for r in rows],
                    "losses": {k: list(v) for k, v in losses.items()},
                    "wall_seconds": earlier_wall + time.perf_counter() - wall_start,
                    "train_seconds": train_seconds,
                },
            )

    result.epochs_done = 1 if result.status == "finished" else 0
    if result.status == "finished":
        rows += _scores(spec, scored(), network, real, device, split, result, progress)
        rows.append(MetricRow(M.GAN_D_LOSS, sum(losses["d"]) / len(losses["d"])))
        rows.append(MetricRow(M.GAN_G_LOSS, sum(losses["g"]) / len(losses["g"])))
    if train_seconds > 0 and step > 0:
        rows.append(MetricRow(M.TRAIN_THROUGHPUT, step * s["batch_size"] / train_seconds))
        rows.append(MetricRow(M.TRAIN_TIME, train_seconds))
    rows.append(MetricRow(M.GAN_G_PARAMS, float(parameter_count(generator))))
    rows.append(MetricRow(M.GAN_D_PARAMS, float(parameter_count(discriminator))))
    # Wall time sums the sessions of a resumed run (each from its own start, data loading included).
    rows.append(MetricRow(M.WALL_TIME, earlier_wall + time.perf_counter() - wall_start))
    result.metrics = rows
    return result


def _optimizer(spec: RunSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    from normbench.optim import create_optimizer

    return create_optimizer(spec.optimizer, model, **spec.hparams)


def _train_step(spec, generator, discriminator, opt_g, opt_d, stream) -> tuple[float, float]:
    """``n_dis`` discriminator steps, then one generator step; the last D loss and the G loss.
    Raises ``FloatingPointError`` on a non-finite loss, before the step that would apply it."""
    s = spec.settings
    device = next(generator.parameters()).device
    for _ in range(s["n_dis"]):
        real, _ = stream.next()
        z = torch.randn(len(real), s["z_dim"], device=device)
        with torch.no_grad():
            fake = generator(z)
        loss_d = d_loss(s["loss"], discriminator(real), discriminator(fake))
        if not torch.isfinite(loss_d):
            raise FloatingPointError(f"non-finite discriminator loss ({loss_d.item()})")
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
    z = torch.randn(s["batch_size"], s["z_dim"], device=device)
    loss_g = g_loss(s["loss"], discriminator(generator(z)))
    if not torch.isfinite(loss_g):
        raise FloatingPointError(f"non-finite generator loss ({loss_g.item()})")
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()  # also fills D's gradients, which its next zero_grad clears
    opt_g.step()
    return loss_d.item(), loss_g.item()


def _scores(spec, generator, network, real, device, split, result, progress) -> list[MetricRow]:
    """FID, KID, the counts behind them, the collapse indicator and the sample grid."""
    s = spec.settings
    images = generate(generator, s["fid_samples"], s["z_dim"], SCORE_NOISE, device)
    started = time.perf_counter()

    def batches(done: int, total: int) -> None:
        progress.on_eval_batch(-(-done // SCORE_BATCH), -(-total // SCORE_BATCH))

    fake = gan_metrics.image_features(
        images, network, batch_size=SCORE_BATCH, device=device, progress=batches
    )
    feature_rate = len(images) / max(time.perf_counter() - started, 1e-9)
    if not torch.isfinite(fake).all():
        raise NormbenchError("the feature network gave non-finite features for generated images")
    fid = gan_metrics.fid_from_features(real, fake)
    kid, kid_std = gan_metrics.kid_from_features(
        real, fake, subsets=s["kid_subsets"], subset_size=s["kid_subset_size"], seed=spec.seed
    )
    diversity = gan_metrics.sample_diversity(images)
    grid = generate(generator, s["grid"], s["z_dim"], GRID_NOISE, device)
    result.artifacts["samples.png"] = sample_grid_png(grid)
    result.info["kid_subset_size"] = min(s["kid_subset_size"], len(real), len(fake))
    return [
        MetricRow(M.GAN_FID, fid, split=split),
        MetricRow(M.GAN_KID, kid, split=split),
        MetricRow(M.GAN_KID_STD, kid_std, split=split),
        MetricRow(M.GAN_GEN_SAMPLES, float(len(fake)), split=split),
        MetricRow(M.GAN_REAL_SAMPLES, float(len(real)), split=split),
        MetricRow(M.GAN_DIVERSITY, diversity),
        MetricRow(M.GAN_COLLAPSED, float(diversity < gan_metrics.COLLAPSE_DIVERSITY)),
        MetricRow(M.GAN_FEATURE_THROUGHPUT, feature_rate),
    ]


def calibrate(spec: RunSpec, device: torch.device, seconds: float = 1.0) -> Rates:
    """A GAN run's rates on random data: ``train`` in generator-step images/s (each with its
    ``n_dis`` discriminator steps), ``evaluation`` in feature-network images/s (a batch of 8 after
    a warm-up)."""
    s = spec.settings
    generator, discriminator = build_gan(
        s["model"], spec.norm, s["d_norm"], z_dim=s["z_dim"], **s["model_args"]
    )
    generator.to(device)
    discriminator.to(device)
    opt_g, opt_d = _optimizer(spec, generator), _optimizer(spec, discriminator)

    class Random:
        def next(self):
            x = torch.rand(s["batch_size"], 3, 32, 32, device=device) * 2 - 1
            return x, None

    def timed(fn, repeat: int) -> float:
        fn()  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        synchronize(device)
        return (time.perf_counter() - start) / repeat

    step = timed(lambda: _train_step(spec, generator, discriminator, opt_g, opt_d, Random()), 2)
    network = gan_metrics.load_feature_network(device)
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    feature = timed(lambda: gan_metrics.image_features(batch, network, device=device), 1)
    return Rates(train=s["batch_size"] / step, evaluation=len(batch) / feature)
