"""The built-in classifiers: the paper's parameter counts, forward shapes, channels_last, and the
structure the guard relies on (classifier = last nn.Linear, hookable single-use ReLUs)."""
import pytest
import torch
from torch import nn

from linkbreaker_ext import models
from linkbreaker_ext.models import MODELS, CifarNet, MnistNet, build_model


def trainable(model):
    return sum(p.numel() for p in model.parameters())


def keras_count(model):
    """What Keras' ``model.summary()`` reports as "Total params": BatchNorm's running mean and
    variance count too (the convention of the STRIP code the paper's models come from)."""
    stats = sum(b.numel() for name, b in model.named_buffers()
                if name.endswith(("running_mean", "running_var")))
    return trainable(model) + stats


# ------------------------------------------------------------------------------ parameter counts

def test_paper_models_have_the_papers_parameter_counts():
    assert trainable(MnistNet(10)) == 80_758  # Table I, 2 Conv + 2 Dense
    assert trainable(CifarNet(10)) == 308_394  # STRIP / Neural Cleanse CIFAR-10 net
    gtsrb = build_model("gtsrb", 43)
    assert type(gtsrb) is models.ResNet20
    assert keras_count(gtsrb) == 276_587  # the paper's GTSRB ResNet20, counted as Keras does
    assert trainable(gtsrb) == 275_211
    # the same net for CIFAR-10 is the Keras ResNet20 v1 example (274,442 total, 273,066 trainable)
    cifar = build_model("cifar10", 10, arch="resnet20")
    assert (keras_count(cifar), trainable(cifar)) == (274_442, 273_066)


@pytest.mark.parametrize("arch,count", [("resnet18", 11_190_891), ("resnet50", 23_588_459),
                                        ("resnet101", 42_580_587)])
def test_table_vii_resnets_on_gtsrb(arch, count):
    # the CIFAR adaptation (3x3 stem, no max-pool) of torchvision's ResNets: 11,173,962 / 23,520,842 /
    # 42,512,970 with 10 classes, plus 33 more rows of the final Linear for GTSRB's 43
    model = build_model("gtsrb", 43, arch=arch)
    assert trainable(model) == count
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_cifarnet_and_mnistnet_state_dict_keys_are_unchanged():
    """Trained weights exist for these: their state_dict keys and shapes must never move."""
    expected = {}
    widths = [3, 32, 32, 64, 64, 128, 128]
    for i in range(1, 7):
        cin, cout = widths[i - 1], widths[i]
        expected.update({f"conv{i}.weight": (cout, cin, 3, 3), f"conv{i}.bias": (cout,),
                         f"bn{i}.weight": (cout,), f"bn{i}.bias": (cout,),
                         f"bn{i}.running_mean": (cout,), f"bn{i}.running_var": (cout,),
                         f"bn{i}.num_batches_tracked": ()})
    expected.update({"fc.weight": (10, 2048), "fc.bias": (10,)})
    state = CifarNet(10).state_dict()
    assert list(state) == list(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    mnist = {k: tuple(v.shape) for k, v in MnistNet(10).state_dict().items()}
    assert mnist == {"conv1.weight": (8, 1, 3, 3), "conv1.bias": (8,), "conv2.weight": (16, 8, 3, 3),
                     "conv2.bias": (16,), "fc1.weight": (100, 784), "fc1.bias": (100,),
                     "fc2.weight": (10, 100), "fc2.bias": (10,)}


# ------------------------------------------------------------------------------ build_model

def test_build_model_defaults_and_arch_choice():
    assert type(build_model("mnist", 10)) is MnistNet
    assert type(build_model("cifar10", 10)) is CifarNet
    assert type(build_model("gtsrb", 43)) is models.ResNet20
    assert type(build_model("gtsrb", 43, arch="resnet18")) is models.ResNet18
    assert type(build_model("gtsrb", 43, arch="cifarnet")) is CifarNet
    assert set(MODELS) == {"mnistnet", "cifarnet", "resnet20", "resnet18", "resnet50", "resnet101"}
    assert build_model("gtsrb", 43).fc.out_features == 43
    grey = build_model("mnist", 10, arch="resnet20")  # 1 input channel, 28x28 works too
    assert grey.conv1.in_channels == 1
    assert grey(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_build_model_errors_name_what_is_known():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*resnet20"):
        build_model("cifar10", 10, arch="vgg")
    with pytest.raises(ValueError, match="no built-in model for 'imagenet'.*gtsrb"):
        build_model("imagenet", 1000)
    with pytest.raises(ValueError, match="mnistnet"):
        build_model("cifar10", 10, arch="mnistnet")


# ------------------------------------------------------------------------------ forward / layout

CASES = [("mnist", 10, None, (1, 28, 28)), ("cifar10", 10, None, (3, 32, 32)),
         ("gtsrb", 43, None, (3, 32, 32)), ("gtsrb", 43, "resnet18", (3, 32, 32)),
         ("gtsrb", 43, "resnet50", (3, 32, 32))]


@pytest.mark.parametrize("dataset,classes,arch,shape", CASES)
def test_forward_shape_channels_last_and_classifier_is_last_linear(dataset, classes, arch, shape):
    torch.manual_seed(0)
    model = build_model(dataset, classes, arch).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, classes) and torch.isfinite(out).all()
        # the guard's late layer: the input of the last registered nn.Linear produces the logits
        name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        seen = {}
        handle = last.register_forward_pre_hook(lambda m, inp: seen.__setitem__("f", inp[0]))
        model(x)
        handle.remove()
        assert torch.allclose(last(seen["f"]), out, atol=1e-5)
        # channels_last weights and inputs give the same answer
        cl = model.to(memory_format=torch.channels_last)
        out_cl = cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out_cl, out, atol=1e-4, rtol=1e-4)


def test_resnet20_trains_in_channels_last_and_every_relu_runs_once():
    """Each ReLU is its own module, used once per forward, so a hook on it sees one activation."""
    torch.manual_seed(0)
    model = build_model("gtsrb", 43).to(memory_format=torch.channels_last)
    calls = {}
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 9 * 2  # stem + two per basic block
    handles = [m.register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, m in relus]
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 42]))
    for h in handles:
        h.remove()
    assert calls == {n: 1 for n, _ in relus}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_crop_only_augmentation_never_mirrors():
    """GTSRB trains with shifts only: a mirrored "keep left" sign is a "keep right" sign."""
    from linkbreaker_ext.training import crop_flip
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, :, 0] = 1.0  # a bar on the left edge
    shifted = crop_flip(x, torch.Generator().manual_seed(0), pad=2, flip=False)
    assert shifted[:, :, :, 5:].sum() == 0  # a shift of at most 2 pixels: the bar stays left
    both = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert both[:, :, :, 5:].sum() > 0  # with flips some copies are mirrored to the right
    with pytest.raises(ValueError, match="augment must be"):
        from linkbreaker_ext import training
        training.train_classifier(torch.nn.Linear(2, 2), torch.zeros(4, 2), torch.zeros(4).long(),
                                  augment="mirror", progress=False)


def test_sgd_recipe_trains_and_decays_weights_only():
    """The SGD recipe (issue #6's accuracy target) learns a separable toy problem, applies weight decay
    to weight matrices and kernels but not to BatchNorm and biases, and skips frozen parameters; an
    unknown recipe is refused by name."""
    from linkbreaker_ext import training
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    before = training.accuracy(net, x, y)
    training.train_classifier(net, x, y, epochs=4, batch_size=32, recipe="sgd", progress=False)
    assert training.accuracy(net, x, y) > max(before, 0.9)
    net[0].bias.requires_grad_(False)
    opt, lr = training.make_optimizer(net, "sgd")
    assert lr == training.RECIPES["sgd"]["lr"] and isinstance(opt, torch.optim.SGD)
    decayed, plain = opt.param_groups
    assert {id(p) for p in decayed["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert id(net[0].bias) not in {id(p) for g in opt.param_groups for p in g["params"]}
    assert training.make_optimizer(net, "adam", lr=0.5)[1] == 0.5
    with pytest.raises(ValueError, match="unknown training recipe 'rmsprop'.*adam"):
        training.train_classifier(net, x, y, recipe="rmsprop", progress=False)


def test_bf16_recipe_runs_the_forward_in_bfloat16_and_keeps_float32_weights(tmp_path):
    """``sgd-bf16`` is the SGD recipe under bfloat16 autocast: the training forward's convolutions
    compute in bfloat16, while the weights, the optimiser and the trained model stay float32, and the
    model still learns. Its checkpoints are not resumed by the float32 recipe; the adaptive attack,
    whose trigger optimisation reads small deviations, refuses it by name."""
    from linkbreaker_ext import training
    from linkbreaker_ext.attacks import AdaptivePatch
    torch.manual_seed(0)
    y = torch.randint(0, 2, (128,))
    x = torch.rand(128, 3, 8, 8)
    x[:, 0] += y[:, None, None]  # the class is the red channel's brightness
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    before = training.accuracy(net, x, y)
    ckpt = tmp_path / "bf16.ckpt"
    training.train_classifier(net, x, y, epochs=6, batch_size=16, recipe="sgd-bf16", lr=0.05,
                              progress=False, checkpoint=ckpt)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert net(x[:4]).dtype == torch.float32  # no autocast outside training
    assert training.accuracy(net, x, y) > max(before, 0.8)
    with pytest.raises(ValueError, match="recipe='sgd-bf16' there, 'sgd' here"):
        training.train_classifier(net, x, y, epochs=6, batch_size=16, recipe="sgd", lr=0.05,
                                  progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match="float32 only: use the 'sgd' recipe, not 'sgd-bf16'"):
        AdaptivePatch().train_backdoored(net, x, y, epochs=1, recipe="sgd-bf16", progress=False)


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(tmp_path):
    """A finished checkpoint resumes to the same weights without training; one written with another
    recipe or length is refused by name (another optimiser's state, or a one-cycle schedule that
    would stop early or overrun), including checkpoints written before runs were recorded."""
    from linkbreaker_ext import training
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    ckpt = tmp_path / "run.ckpt"

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    first = training.train_classifier(net(), x, y, epochs=2, batch_size=16, progress=False, checkpoint=ckpt)
    again = training.train_classifier(net(), x, y, epochs=2, batch_size=16, progress=False, checkpoint=ckpt)
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another training run.*recipe='adam' there, 'sgd' here"):
        training.train_classifier(net(), x, y, epochs=2, batch_size=16, recipe="sgd", progress=False,
                                  checkpoint=ckpt)
    with pytest.raises(ValueError, match="epochs=2 there, 3 here"):
        training.train_classifier(net(), x, y, epochs=3, batch_size=16, progress=False, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["made_with"]  # a checkpoint from before the record: its optimiser tells the recipe
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="recipe='adam' there, 'sgd' here"):
        training.train_classifier(net(), x, y, epochs=2, batch_size=16, recipe="sgd", progress=False,
                                  checkpoint=ckpt)
    training.train_classifier(net(), x, y, epochs=2, batch_size=16, progress=False, checkpoint=ckpt)
