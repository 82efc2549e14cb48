"""Every importance criterion: the contract (one finite score per output channel, model untouched,
deterministic, prunable), and what each one's values mean on cases where the answer is known."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import models  # noqa: F401  (torchvision compatibility)
from models.unet import UNet
from pipeline.config import check_target_keys, validate
from pipeline.criteria import Criterion, ScoringContext, build_criterion
from pipeline.criteria.attention import KINDS, AttentionCriterion, eca_kernel
from pipeline.criteria.datadriven import ActivationCriterion, TaylorCriterion
from pipeline.criteria.magnitude import MagnitudeCriterion, filter_norms
from pipeline.criteria.tracing import ChainEndHooks, sequential_bn, trace_chains
from pipeline.criteria.weights import BNScaleCriterion, FPGMCriterion, RandomCriterion, fpgm_scores
from pipeline.paths import CONF_DIR
from pipeline.pruning import prunable_layers, prune
from helpers import conf, kwargs_of, training_loss

CRITERION_DIR = Path(CONF_DIR) / "criterion"
NAMES = sorted(p.stem for p in CRITERION_DIR.glob("*.yaml"))
CPU = torch.device("cpu")
LOSS = training_loss()
SIZE = 32


def build(name: str, **overrides) -> Criterion:
    seed = overrides.pop("seed", 0)  # the job's seed, passed as the score stage passes it
    return build_criterion(conf("criterion", name, **overrides), seed=seed)


def synthetic_batches(n_batches=2, batch=4, seed=1):
    """Images whose mask is where the (smoothed) first channel is positive: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, 3, SIZE, SIZE, generator=g)
    y = (nn.functional.avg_pool2d(x[:, :1], 5, 1, 2) > 0).float()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def context(batches) -> ScoringContext:
    return ScoringContext(device=CPU, batches=lambda: iter(batches), loss=LOSS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's cores are shared: one intra-op thread is several times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A tiny UNet trained 30 Adam steps on two synthetic batches (so weights, BN gammas, activations and
    gradients are no longer at their initial values), in eval mode, with its calibration batches."""
    torch.manual_seed(0)
    model = UNet(in_channels=3, num_classes=1, width=8, depth=2)
    batches = synthetic_batches()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(30):
        images, masks = batches[step % 2]
        opt.zero_grad()
        LOSS(model(images), masks).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), batches


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert list(after) == list(before["state"]), "state_dict keys changed"
    for k, v in before["state"].items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert [(n, type(m), id(m)) for n, m in model.named_modules()] == before["modules"], "modules changed"
    assert [m.training for m in model.modules()] == before["training"], "train/eval modes not restored"
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"], "requires_grad not restored"
    assert all(p.grad is None for p in model.parameters()), "a .grad was left on a parameter"
    for name, m in model.named_modules():
        for d in HOOK_DICTS:
            assert not getattr(m, d), f"{name}.{d} left behind"
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks


# ---------------------------------------------------------------------------------------------------
# The contract, for every YAML in conf/criterion/


def test_the_criteria_of_the_pruning_methods_issue_all_have_a_yaml():
    expected = {"l1", "l2", "random", "fpgm", "bn_scale", "taylor", "activation", "se", "eca", "cbam", "saca", "sbca"}
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_keys_are_constructor_parameters_and_name_is_the_file_name(name):
    cfg = OmegaConf.load(CRITERION_DIR / f"{name}.yaml")
    assert cfg.name == name
    check_target_keys(cfg, "criterion")  # what the pipeline checks at start-up
    from pipeline import shell

    shell.start()  # the schema and the resolvers, as every entry registers them (idempotent)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose("config", overrides=[f"criterion={name}"])
    validate(composed)
    criterion = build_criterion(composed.criterion, composed.seed)  # as the score stage builds it
    assert isinstance(criterion, Criterion) and criterion.name == name
    params = inspect.signature(type(criterion).__init__).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("name", NAMES)
def test_criterion_contract(name, trained):
    base, batches = trained
    model = copy.deepcopy(base)
    model.train()
    model.encoder[0].eval()  # mixed modes: each module's mode must come back as it was
    model.segmentation_head.weight.requires_grad_(False)
    layers = prunable_layers(model)
    before = snapshot(model)
    rng = torch.get_rng_state()

    scores = build(name).score(model, layers, context(batches))

    assert set(scores) == set(layers)
    for layer_name, layer in layers.items():
        s = scores[layer_name]
        assert s.shape == (layer.out_channels,), layer_name
        assert s.dtype.is_floating_point and torch.isfinite(s).all(), layer_name
    assert_untouched(model, before)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was consumed"

    again = build(name).score(model, layers, context(batches))  # deterministic (seeded where random)
    for layer_name in layers:
        assert torch.equal(scores[layer_name], again[layer_name]), layer_name

    x = batches[0][0][:1]
    result = prune(model.eval(), scores, x, 0.5)
    for row in result.channels:
        assert row["after"] == row["before"] // 2, row
    out = result.model(x)
    assert out.shape == (1, 1, SIZE, SIZE) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["taylor", "activation", "se"])
def test_data_driven_criteria_without_data_say_so(name, trained):
    model, _ = trained
    with pytest.raises(ValueError, match="calibration data"):
        build(name).score(copy.deepcopy(model), prunable_layers(model), ScoringContext(device=CPU))


def test_bad_keys_fail_naming_the_key():
    with pytest.raises(ValueError, match="criterion.kind"):
        AttentionCriterion(**kwargs_of("criterion", "se", kind="transformer", seed=0))
    with pytest.raises(ValueError, match="criterion.calibration_batches"):
        TaylorCriterion(**kwargs_of("criterion", "taylor", calibration_batches=0))
    with pytest.raises(ValueError, match="criterion.p"):
        FPGMCriterion(**kwargs_of("criterion", "fpgm", p=0))


# ---------------------------------------------------------------------------------------------------
# What the values mean


def test_random_is_seeded_per_layer():
    model = UNet(3, 1, width=4, depth=2)
    layers = prunable_layers(model)
    a, b, c = (RandomCriterion(**kwargs_of("criterion", "random", seed=s)).score(model, layers, None) for s in (0, 0, 1))
    assert all(torch.equal(a[n], b[n]) for n in layers)
    assert all(not torch.equal(a[n], c[n]) for n in layers)
    first = next(iter(layers))  # a layer's scores do not depend on which other layers are scored
    assert torch.equal(RandomCriterion(**kwargs_of("criterion", "random", seed=0)).score(model, {first: layers[first]}, None)[first], a[first])


def test_fpgm_ranks_a_duplicated_filter_lowest():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3)
    with torch.no_grad():
        conv.weight[5] = conv.weight[2]
    scores = FPGMCriterion(**kwargs_of("criterion", "fpgm")).score(None, {"conv": conv}, None)["conv"]
    assert scores[2] == pytest.approx(float(scores[5]))
    assert set(scores.argsort()[:2].tolist()) == {2, 5}


def test_fpgm_keeps_distinctive_filters_that_l1_would_remove():
    # Four filters on a ring around a large centre m and two copies of m: the copies have the largest
    # norms (L1 keeps them) but lie on the geometric median (FPGM removes them first).
    m = torch.tensor([10.0, 10.0])
    w = torch.stack([m + torch.tensor(d) for d in ([1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0])] + [m, m])
    conv = nn.Conv2d(2, 6, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w.view(6, 2, 1, 1))
    s = FPGMCriterion(**kwargs_of("criterion", "fpgm")).score(None, {"conv": conv}, None)["conv"]
    assert s[4] == pytest.approx(4.0) and s[5] == pytest.approx(4.0)
    assert s[:4].tolist() == pytest.approx([2 + 2 * 2 ** 0.5 + 2] * 4)
    assert torch.equal(fpgm_scores(w), s)
    up = nn.ConvTranspose2d(3, 5, 2)  # (in, out, kh, kw): one score per output channel
    assert FPGMCriterion(**kwargs_of("criterion", "fpgm")).score(None, {"up": up}, None)["up"].shape == (5,)


def test_bn_scale_is_abs_gamma_of_the_following_batchnorm_and_l1_elsewhere():
    torch.manual_seed(0)
    model = UNet(3, 1, width=4, depth=2).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)  # some negative: the score is |gamma|
    layers = prunable_layers(model)
    criterion = BNScaleCriterion(**kwargs_of("criterion", "bn_scale"))
    scores = criterion.score(model, layers, None)
    modules = dict(model.named_modules())
    pairs = sequential_bn(model, layers)
    assert len(pairs) == len(layers) - 2  # all but the two ConvTranspose up-samplings
    for conv, bn in pairs.items():
        assert torch.equal(scores[conv], modules[bn].weight.detach().abs()), conv
    assert sorted(criterion.last_fallback) == ["decoder.0.up", "decoder.1.up"]
    for name in criterion.last_fallback:
        assert torch.equal(scores[name], filter_norms(layers[name], 1))


def test_batchnorm_called_from_forward_is_found_by_tracing():
    # A ResNet-like block: bn1 is an attribute called in forward (no Sequential), and an in-place add
    # between conv2's BatchNorm and the shared ReLU must end conv2's chain at bn2.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.segmentation_head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            a = self.relu(self.bn1(self.conv1(x)))
            b = self.bn2(self.conv2(a))
            b += a
            return self.segmentation_head(self.relu(b))

    torch.manual_seed(0)
    model = Block().eval()
    for bn in (model.bn1, model.bn2):
        nn.init.normal_(bn.weight)
    layers = prunable_layers(model)
    chains = trace_chains(model, layers, torch.randn(1, 3, 8, 8))
    assert chains["conv1"].modules == ["bn1", "relu"] and chains["conv1"].end == ("relu", 0)
    assert chains["conv2"].modules == ["bn2"] and chains["conv2"].end == ("bn2", 0)
    scores = BNScaleCriterion(**kwargs_of("criterion", "bn_scale")).score(model, layers, None)
    assert torch.equal(scores["conv1"], model.bn1.weight.detach().abs())
    assert torch.equal(scores["conv2"], model.bn2.weight.detach().abs())


def test_smp_resnet_unet_every_conv_has_its_batchnorm_and_shared_relus_are_told_apart():
    from models.smp import build_smp

    torch.manual_seed(0)
    model = build_smp(in_channels=3, num_classes=1, **kwargs_of("model", "smp_unet", encoder_name="resnet18")).eval()
    layers = prunable_layers(model)
    criterion = BNScaleCriterion(**kwargs_of("criterion", "bn_scale"))
    scores = criterion.score(model, layers, None)
    assert criterion.last_fallback == []
    enc = model.encoder
    assert torch.equal(scores["encoder.conv1"], enc.bn1.weight.detach().abs())
    assert torch.equal(scores["encoder.layer2.0.downsample.0"], enc.layer2[0].downsample[1].weight.detach().abs())
    # BasicBlock calls one `relu` twice: after bn1 (conv1's chain end) and after the residual add.
    chains = trace_chains(model, layers, torch.randn(1, 3, SIZE, SIZE))
    assert chains["encoder.layer1.0.conv1"].end == ("encoder.layer1.0.relu", 0)
    assert chains["encoder.layer1.0.conv2"].end == ("encoder.layer1.0.bn2", 0)


def test_taylor_on_a_linear_hand_made_network():
    # logits = sum_c h_c * w_c * x: w_c * dL/dw_c = sum over pixels of dL/dlogit * (channel c's share of the
    # logit), so channel shares 1 : 3 : 0 give Taylor scores 1 : 3 : 0 (L1 would rank channel 2 first).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 1, bias=False)
            self.segmentation_head = nn.Conv2d(3, 1, 1, bias=False)

        def forward(self, x):
            return self.segmentation_head(self.conv(x))

    net = Net()
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1, 1))
        net.segmentation_head.weight.copy_(torch.tensor([1.0, 1.5, 0.0]).view(1, 3, 1, 1))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 1, 4, 4, generator=g), (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()) for _ in range(2)]
    layers = prunable_layers(net)
    scores = TaylorCriterion(**kwargs_of("criterion", "taylor", calibration_batches=2)).score(net, layers, context(batches))["conv"]

    expected = torch.zeros(3)
    for x, y in batches:
        logits = net(x).detach().requires_grad_(True)
        dlogits, = torch.autograd.grad(LOSS(logits, y), logits)
        shares = torch.tensor([1.0, 3.0, 0.0]).view(1, 3, 1, 1) * x  # h_c * w_c * x
        expected += (dlogits * shares).sum(dim=(0, 2, 3)).abs() / 2
    assert scores.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert scores[1] == pytest.approx(3 * float(scores[0]), rel=1e-5) and scores[2] == 0
    assert net.conv.weight.grad is None


def test_activation_is_measured_after_batchnorm_and_relu(trained):
    model, batches = trained
    model = copy.deepcopy(model)
    seen = {}
    relu, up = model.encoder[1].conv[2], model.decoder[0].up
    hooks = [relu.register_forward_hook(lambda m, i, o: seen.setdefault("relu", []).append(o.detach().clone())),
             up.register_forward_hook(lambda m, i, o: seen.setdefault("up", []).append(o.detach().clone()))]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    scores = ActivationCriterion(**kwargs_of("criterion", "activation", calibration_batches=2)).score(model, prunable_layers(model), context(batches))
    post = torch.cat(seen["relu"]).abs().mean(dim=(0, 2, 3))
    assert scores["encoder.1.conv.0"].tolist() == pytest.approx(post.tolist(), rel=1e-5)
    assert scores["decoder.0.up"].tolist() == pytest.approx(torch.cat(seen["up"]).abs().mean(dim=(0, 2, 3)).tolist(), rel=1e-5)


def test_chain_end_hooks_gate_only_their_own_call_of_a_shared_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)
            self.relu = nn.ReLU()
            self.segmentation_head = nn.Conv2d(2, 1, 1)

        def forward(self, x):
            return self.segmentation_head(self.relu(self.b(self.relu(self.a(x)))))

    torch.manual_seed(0)
    net = Net().eval()
    layers = prunable_layers(net)
    x = torch.randn(1, 1, 4, 4)
    chains = trace_chains(net, layers, x)
    assert chains["a"].end == ("relu", 0) and chains["b"].end == ("relu", 1)
    with torch.no_grad(), ChainEndHooks(net, {"b": chains["b"]}, lambda layer, out: torch.zeros_like(out)):
        gated = net(x)
    assert torch.allclose(gated, net.segmentation_head.bias.view(1, 1, 1, 1).expand_as(gated))
    assert not net.relu._forward_hooks


@pytest.mark.parametrize("kind", KINDS)
def test_attention_gates_learn_and_rank_differently_from_l1(kind, trained):
    model, batches = trained
    model = copy.deepcopy(model)
    layers = prunable_layers(model)
    criterion = build(kind)
    scores = criterion.score(model, layers, context(batches))
    assert criterion.losses[-1] < criterion.losses[0]  # the gates trained (loss + sparsity penalty fell)
    for s in scores.values():
        assert ((s >= 0) & (s <= 1)).all()  # mean sigmoid gates
    l1 = build("l1").score(model, layers, None)
    rho = [spearman(scores[n], l1[n]) for n in layers]
    assert sum(rho) / len(rho) < 0.8, rho
    assert min(rho) < 0.5, rho
    other = build(kind, seed=1).score(model, layers, context(batches))
    differs = any(not torch.equal(scores[n], other[n]) for n in layers)
    assert differs == (kind != "eca")  # the seed sets the MLPs' first layer; eca's only conv starts at 0


def test_eca_kernel_size_is_adaptive_and_odd():
    assert [eca_kernel(c) for c in (4, 16, 64, 256, 512)] == [1, 3, 3, 5, 5]


def test_saturated_gates_are_ordered_by_their_logit():
    from pipeline.criteria.attention import break_ties

    scores = torch.tensor([0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.3])
    logits = torch.tensor([-50.0, 0.0, -90.0, 30.0, 20.0, -60.0, -1.0])
    out = break_ties(scores, logits)
    assert torch.equal(out.argsort(), logits.argsort())
    assert out.unique().numel() == out.numel()
    assert torch.allclose(out, scores, atol=1e-6) and ((out >= 0) & (out <= 1)).all()


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_is_torch_prunings_magnitude_importance_of_each_layer(p):
    """L1/L2 are torch-pruning's GroupMagnitudeImportance on each layer's own filters (root of its group;
    for p=2 the square root of its sum of squares): the same numbers, wherever that class applies."""
    import torch_pruning as tp

    from helpers import model_from_conf

    importance = tp.importance.GroupMagnitudeImportance(p=p, normalizer=None, group_reduction="first", bias=False)
    for model in (model_from_conf("unet_tiny").eval(), model_from_conf("attention_unet", width=4, depth=2).eval()):
        layers = prunable_layers(model)
        ours = MagnitudeCriterion(name=f"l{p}", p=p).score(model, layers, None)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
        for name, layer in layers.items():
            group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))
            root = tp.dependency.Group()  # the layer's own output channels
            root.add_dep(group[0].dep, group[0].idxs)
            root[0].root_idxs = group[0].root_idxs
            with torch.no_grad():
                theirs = importance(root).float()
            assert torch.allclose(ours[name], theirs.sqrt() if p == 2 else theirs, rtol=1e-5, atol=1e-6), name
