"""The GPU path, checked where it can be on a CPU: a training step that never reads the device
back (host syncs counted through the Python-visible hooks), divergence noticed on the device at
the step it happened, progress from the device's step counter every ``sync_every`` steps, the
data order drawn by a generator on the run's device (reproducible and resumable), the ``gpu``
budget's network and recipe, ``torch.compile`` and cuDNN options, and ``--device cuda`` where
there is no CUDA. With a GPU, the CUDA tests check the same step under CUDA's own sync
detector."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import invoke, tiny_suite

from normbench.data import TensorLoader, load_cifar10
from normbench.errors import NormbenchError
from normbench.models import conv_norm_factory, create_model, parameter_count
from normbench.norms import NORMS
from normbench.optim import DivergenceWatch, NonFiniteStep, create_optimizer, training_step
from normbench.runtime import compiled_for_training, configure_kernels
from normbench.suites import load_suite, plan
from runners import classify

CPU = torch.device("cpu")

#: Tensor methods through which Python code reads a device value back to the host.
HOST_READS = (
    "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__",
)  # fmt: skip


@contextlib.contextmanager
def count_host_reads():
    """Count the calls of every HOST_READS method of torch.Tensor (and cuda.synchronize)."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return method(self, *args, **kwargs)

        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(name, method))
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: calls.append("synchronize") or sync(*a, **k)
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.cuda.synchronize = sync


@pytest.fixture
def train_images(cifar_dir):
    return load_cifar10("train", cifar_dir).subset(256, seed=0)


def steps_of(model, optimizer, loader, watch, device=CPU):
    """The classify loop's per-step work: batch, forward, step, running loss and accuracy."""
    losses, correct = [], torch.zeros((), device=device)
    for x, y in loader:
        for group in optimizer.param_groups:
            group["lr"] = 0.1  # a Python float: setting it reads nothing back

        def forward(x=x, y=y):
            out = model(x)
            return out, F.cross_entropy(out, y, label_smoothing=0.2)

        out, loss = training_step(optimizer, forward, watch)
        losses.append(loss.detach())
        correct += (out.argmax(1) == y).sum()
    return losses, correct


# Every registered norm the fast net hosts (the ones that own their convolution included).
HOSTED = [e.info.name for e in NORMS]


@pytest.mark.parametrize(
    "norm, optimizer",
    [(n, o) for n in ("batchnorm", "groupnorm", "layernorm", "convnorm") for o in ("sgd", "sam_on")]
    + [("none", "sgd"), ("none", "sam")],
)
def test_a_training_step_reads_nothing_back_from_the_device(train_images, norm, optimizer):
    torch.manual_seed(0)
    model = create_model(
        "fastnet", block=conv_norm_factory(norm), num_classes=10, widths=(8, 16, 16, 16)
    )
    opt = create_optimizer(optimizer, model, lr=0.1, **({"rho": 0.5} if optimizer != "sgd" else {}))
    generator = torch.Generator(device=CPU).manual_seed(0)
    loader = TensorLoader(train_images, 64, device=CPU, train=True, generator=generator,
                          crop_padding=2, flip=True)  # fmt: skip
    watch = DivergenceWatch(CPU)
    with count_host_reads() as calls:
        steps_of(model, opt, loader, watch)
    assert calls == [], f"{norm} + {optimizer}: host reads during training steps: {calls}"
    with count_host_reads() as calls:
        assert watch.poll() == len(loader) == 4
    assert len(calls) == 1  # the poll: one transfer of the step count and the first bad step


def test_every_norm_trains_without_reading_the_device(train_images):
    """The same check over the whole norm zoo, one SGD step each: a norm whose forward or
    backward reads a value back would stall every step of a GPU run."""
    offenders, tested = {}, []
    x, y = train_images.images[:16].float() / 255, train_images.labels[:16]
    for name in HOSTED:
        torch.manual_seed(0)
        try:
            model = create_model(
                "fastnet", block=conv_norm_factory(name), num_classes=10, widths=(8, 16, 16, 16)
            )
        except NormbenchError:  # a residual gate (skipinit): the fast net has no residual branch
            continue
        tested.append(name)
        opt = create_optimizer("sgd", model, lr=0.01)
        watch = DivergenceWatch(CPU)
        with count_host_reads() as calls:
            training_step(opt, lambda m=model: (out := m(x), F.cross_entropy(out, y)), watch)
        if calls:
            offenders[name] = sorted(set(calls))
    assert not offenders, f"norms that read device values back in a training step: {offenders}"
    assert len(tested) >= 15, tested


def test_divergence_is_found_on_the_device_at_the_step_it_happened(train_images):
    """With the watch, the first non-finite step is the one the step-by-step check finds."""

    def run(watch):
        torch.manual_seed(0)
        model = create_model(
            "fastnet", block=conv_norm_factory("batchnorm"), num_classes=10, widths=(8, 8, 8, 8)
        )
        opt = create_optimizer("sgd", model, lr=1e6, momentum=0.9)
        loader = TensorLoader(train_images, 32, device=CPU, train=True,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
        for step, (x, y) in enumerate(loader):
            try:
                training_step(opt, lambda x=x, y=y: (o := model(x), F.cross_entropy(o, y)), watch)
            except NonFiniteStep:
                return step
        return None

    synchronous = run(None)
    assert synchronous is not None and synchronous > 0  # it trains a step or more, then blows up
    watch = DivergenceWatch(CPU)
    assert run(watch) is None  # nothing raised during the steps: no sync
    with pytest.raises(NonFiniteStep, match=f"at step {synchronous}$"):
        watch.poll()
    assert watch.first_bad_step == synchronous


def test_a_run_reads_the_device_every_sync_every_steps_and_reports_its_divergence(
    cifar_dir, tmp_path
):
    text = tiny_suite(tmp_path).read_text().replace("epochs = 1", "epochs = 2")
    (tmp_path / "t.toml").write_text(text + "sync_every = 3\n")
    spec = plan(load_suite(str(tmp_path / "t.toml")), "smoke")[0]
    spec = dataclasses.replace(spec, settings={**spec.settings, "speed_pairs": 0})
    seen: list[int] = []
    result = classify.run(spec, device=CPU, data_dir=cifar_dir,
                          progress=classify.Progress(on_step=seen.append))  # fmt: skip
    assert result.status == "finished" and result.info["sync_every"] == 3
    # 512 images in batches of 128: 4 steps an epoch; polled every 3 steps and after each
    # epoch's first and last steps (the display times the steps between its polls)
    assert seen == [1, 3, 4, 5, 6, 8]

    hot = tmp_path / "hot.toml"
    hot.write_text(tiny_suite(tmp_path, "hot", lr=1e12).read_text() + "sync_every = 100\n")
    spec = plan(load_suite(str(hot)), "smoke")[0]
    result = classify.run(spec, device=CPU, data_dir=cifar_dir)
    assert result.status == "diverged" and result.epochs_done == 0
    assert result.reason.endswith(f"at step {result.diverged_step}")


def test_the_data_order_comes_from_a_generator_on_the_device_reproducibly_and_resumably(
    train_images,
):
    def epochs(loader, n):
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]

    def loader(generator):
        return TensorLoader(train_images, 64, device=CPU, train=True, generator=generator,
                            crop_padding=2, flip=True)  # fmt: skip

    default = TensorLoader(train_images, 64, device=CPU, train=True)
    assert default.generator.device == CPU  # on the loader's device unless one is given
    a = loader(torch.Generator(device=CPU).manual_seed(7))
    first = epochs(a, 1)
    state = a.generator.get_state()  # what a checkpoint keeps after an epoch
    second = epochs(a, 1)
    again = loader(torch.Generator(device=CPU).manual_seed(7))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(epochs(again, 1)[0], first[0], strict=True))  # fmt: skip
    resumed = loader(torch.Generator(device=CPU))
    resumed.generator.set_state(state)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(epochs(resumed, 1)[0], second[0], strict=True))  # fmt: skip
    assert not torch.equal(first[0][0][1], second[0][0][1])  # each epoch its own order


def test_the_gpu_budget_is_airbench_shaped_and_trains_every_norm_through_the_factory():
    suite = load_suite("cifar10")
    s = suite.spec.budgets["gpu"]
    assert (s.model, s.batch_size, s.epochs, s.label_smoothing) == ("airbench", 1024, 10, 0.2)
    assert s.cudnn_benchmark and not s.compile and s.sync_every == 50
    assert s.optimizers["sgd"]["nesterov"] and s.augment.crop_padding == 2 and s.augment.flip
    for name in ("cifar-c", "sam-on", "adversarial", "label-noise", "cifar-c-tta"):
        assert load_suite(name).spec.budgets["gpu"].model == "airbench", name
    x = torch.randn(4, 3, 32, 32)
    for norm in ("batchnorm", "groupnorm", "layernorm", "convnorm", "frn"):
        model = create_model("airbench", block=conv_norm_factory(norm), num_classes=10)
        assert model(x).shape == (4, 10), norm
    model = create_model("airbench", block=conv_norm_factory("batchnorm"), num_classes=10)
    assert 1.9e6 < parameter_count(model) < 2.1e6
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 7


def test_compile_is_off_on_the_cpu_and_falls_back_to_eager_with_a_warning(monkeypatch):
    model = torch.nn.Linear(2, 2)
    info: dict = {}
    assert compiled_for_training(model, {"compile": True}, CPU, info) is model
    assert info["compile"] == "off on cpu"
    assert compiled_for_training(model, {"compile": False}, CPU, info) is model
    assert info["compile"] == "off"
    from normbench import runtime

    monkeypatch.setattr(runtime, "_compile_unavailable", lambda: "Triton is not installed")
    with pytest.warns(UserWarning, match="Triton is not installed"):
        same = compiled_for_training(model, {"compile": True}, torch.device("cuda"), info)
    assert same is model and info["compile"] == "unavailable (Triton is not installed); eager"
    assert configure_kernels(CPU, True) == {"cudnn_benchmark": False}


def test_device_cuda_without_cuda_exits_2_naming_the_device_found(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("run", "--suite=cifar10", "--budget=smoke", "--device=cuda",
                    f"--db={tmp_path / 'r.db'}")  # fmt: skip
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "CUDA is not available here" in text and "the device found is CPU" in text
    assert not (tmp_path / "r.db").exists() or "finished" not in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_training_step_never_synchronizes(train_images):
    cuda = torch.device("cuda")
    model = create_model(
        "airbench", block=conv_norm_factory("batchnorm"), num_classes=10
    ).to(cuda, memory_format=torch.channels_last)
    opt = create_optimizer("sgd", model, lr=0.1)
    loader = TensorLoader(train_images, 64, device=cuda, train=True, crop_padding=2, flip=True)
    watch = DivergenceWatch(cuda)
    steps_of(model, opt, loader, watch, cuda)  # warm-up: allocator, cuDNN
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps_of(model, opt, loader, watch, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.poll() == 2 * len(loader)
