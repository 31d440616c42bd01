from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from neaudit.errors import ModelSpecError
from neaudit.stem import first_layer
from neaudit.zoo import PRESETS, ModelSpec, create_model, wrap


def test_spec_parsing_keeps_options():
    spec = ModelSpec.parse("timm:vit_small_patch16_224?pretrained=false&num_classes=10&img_size=64")
    assert spec.scheme == "timm" and spec.target == "vit_small_patch16_224"
    assert spec.options == {"pretrained": "false", "num_classes": "10", "img_size": "64"}


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(ModelSpecError, match=r"unknown model spec 'keras:x'.*timm:.*open_clip:"):
        create_model("keras:x")


def test_unknown_timm_model():
    with pytest.raises(ModelSpecError, match=r"timm has no model 'resnet_nope'"):
        create_model("timm:resnet_nope")


def test_missing_pretrained_weights_say_how_to_provide_them():
    # weights that no test machine has cached; nothing may touch the network
    with pytest.raises(ModelSpecError, match=r"never downloads.*weights=/path"):
        create_model("timm:vit_huge_patch14_clip_224.laion2b?pretrained=true")
    with pytest.raises(ModelSpecError, match=r"never downloads"):
        create_model("open_clip:ViT-H-14?pretrained=laion2b_s32b_b79k", class_names=["a"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load(tmp_path: Path, suffix):
    source = timm.create_model("resnet18", num_classes=10)
    state = source.state_dict()
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = create_model(f"timm:resnet18?num_classes=10&input_size=32&weights={path}")
    x = torch.rand(2, 3, 32, 32)
    expected = source.eval()((x - model.mean) / model.std)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_wrapper_owns_resize_and_normalization():
    model = create_model("timm:vit_small_patch16_224?img_size=64&num_classes=10")
    assert model.input_size == (64, 64)
    big = torch.rand(1, 3, 128, 128)
    assert model(big).shape == (1, 10)  # resized inside the wrapper
    zeros = model.preprocess(torch.zeros(1, 3, 64, 64))
    cfg = model.net.pretrained_cfg
    assert torch.allclose(zeros[0, :, 0, 0], -torch.tensor(cfg["mean"]) / torch.tensor(cfg["std"]))


def test_torchscript_and_python_factories(tmp_path: Path):
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(), nn.LazyLinear(5))
    net(torch.zeros(1, 3, 16, 16))
    scripted = tmp_path / "m.pt"
    torch.jit.trace(net.eval(), torch.zeros(1, 3, 16, 16)).save(str(scripted))
    ts = create_model(f"torchscript:{scripted}?input_size=16&mean=0.5,0.5,0.5&std=0.5,0.5,0.5")
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ts(x), net((x - 0.5) / 0.5), atol=1e-5)

    (tmp_path / "factory.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.AdaptiveAvgPool2d(1),"
        " nn.Flatten(), nn.Linear(4, 3))\n")
    module = create_model(f"python:{tmp_path / 'factory.py'}:make?input_size=32")
    weights = tmp_path / "sd.pt"
    torch.save(module.net.state_dict(), weights)
    again = create_model(f"python:{tmp_path / 'factory.py'}:make?input_size=32&weights={weights}")
    assert torch.allclose(module(torch.rand(1, 3, 32, 32) * 0 + 0.3),
                          again(torch.rand(1, 3, 32, 32) * 0 + 0.3))
    layer = first_layer(again)
    assert layer.kernel == (3, 3) and layer.stride == (2, 2) and layer.padding == (1, 1)


@pytest.mark.parametrize("spec, shape, stride, overlapping", [
    ("timm:vit_small_patch16_224?img_size=64", (384, 768), (16, 16), False),
    ("timm:resnet50", (64, 147), (2, 2), True),
    ("timm:convnext_atto", (40, 48), (4, 4), False),
    ("timm:efficientnet_b0", (32, 27), (2, 2), True),
    ("timm:swin_tiny_patch4_window7_224", (96, 48), (4, 4), False),
])
def test_first_layer_is_traced_not_looked_up(spec, shape, stride, overlapping):
    model = create_model(spec)
    layer = first_layer(model, (64, 64))
    assert tuple(layer.unfolded.shape) == shape
    assert layer.stride == stride and layer.overlapping == overlapping
    assert torch.allclose(layer.std, model.std.flatten())


def test_first_layer_of_open_clip_zero_shot_model():
    model = create_model("open_clip:ViT-B-32?pretrained=", class_names=["cat", "dog", "car"])
    layer = first_layer(model)
    assert tuple(layer.unfolded.shape) == (768, 3 * 32 * 32) and not layer.overlapping
    assert model(torch.rand(2, 3, 224, 224)).shape == (2, 3)


def test_first_layer_stops_the_pass_at_the_stem():
    class Counted(nn.Module):
        def __init__(self, catches: bool):
            super().__init__()
            self.stem, self.head, self.catches, self.head_calls = (
                nn.Conv2d(3, 4, 4, 4), nn.Linear(4, 3), catches, 0)

        def forward(self, x):
            try:
                features = self.stem(x).mean((2, 3))
            except Exception:  # a network that swallows errors around its layers
                if not self.catches:
                    raise
                features = x.new_zeros(len(x), 4)
            self.head_calls += 1
            return self.head(features)

    stopped, swallowing = Counted(catches=False), Counted(catches=True)
    for net in (stopped, swallowing):
        layer = first_layer(wrap(net, input_size=(16, 16)))
        assert layer.module_name == "stem" and layer.stride == (4, 4)
        assert torch.equal(layer.weight, net.stem.weight)
    assert stopped.head_calls == 0  # the rest of the network never ran
    assert swallowing.head_calls == 1


def test_first_layer_refuses_a_stem_that_does_not_see_pixels():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x * 2.0).mean((2, 3))

    with pytest.raises(ModelSpecError, match=r"does not see the normalized pixels"):
        first_layer(wrap(Shifted(), input_size=(16, 16)))


def test_presets_span_families():
    families = {"resnet", "convnext", "efficientnet", "mobilenet", "vit", "deit", "swin",
                "regnet", "rn50", "vit-b"}
    for name in ("imagenet-cnn", "imagenet-vit", "imagenet-mixed", "clip"):
        specs = PRESETS[name]
        assert len(specs) >= 4
        seen = {f for s in specs for f in families if f in s.lower()}
        assert len(seen) >= 3 or name == "clip", (name, seen)
        for text in specs:
            ModelSpec.parse(text)


def test_zoo_list_marks_which_models_load_offline(tmp_path):
    """A planted Hugging Face cache entry shows as cached, the rest of the presets as not,
    the shipped demo models as shipped; --check builds them to be sure."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--timm--resnet50.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"planted")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def listing(*extra: str) -> dict[str, str]:
        out = subprocess.run([sys.executable, "-m", "neaudit.cli", "zoo", "list", *extra],
                             capture_output=True, text=True, env=env, check=True).stdout
        rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
        return {row[-1]: " ".join(row[:-1]) for row in rows}

    quick = listing()
    assert quick["timm:resnet50.a1_in1k?pretrained=true"] == "cached"
    assert quick["timm:convnext_tiny.fb_in1k?pretrained=true"] == "not cached"
    assert quick["demo:patch_cnn"] == "shipped"
    assert quick["open_clip:ViT-B-32?pretrained=openai"] == "check"
    checked = listing("--check")
    assert checked["demo:patch_cnn"] == "loads"
    assert checked["open_clip:ViT-B-32?pretrained=openai"].startswith("fails")
    assert checked["timm:convnext_tiny.fb_in1k?pretrained=true"].startswith("fails")


def test_zoo_inspect_prints_the_stem_and_its_subspace(capsys, vit_spec):
    from neaudit.cli import main

    assert main(["zoo", "inspect", vit_spec]) == 0
    out = capsys.readouterr().out
    assert "stem 'patch_embed.proj' 384×768 kernel (16, 16)" in out and "(non-overlapping)" in out
    assert "subspace rank 384: min gain 0 vs isotropic" in out  # a 384×768 stem: a null space
    assert main(["zoo", "inspect", "timm:resnet18?num_classes=10&input_size=32"]) == 0
    out = capsys.readouterr().out
    assert "(overlapping)" in out and "mean [0.485, 0.456, 0.406]" in out  # rounded for reading
    assert main(["zoo", "inspect", "timm:no_such_model"]) == 2
