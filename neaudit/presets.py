"""Named zoos of public pretrained models (``--zoo imagenet-mixed``): specs only, resolved
by :func:`neaudit.zoo.create_model`, whose weights must already be in the local cache."""

from __future__ import annotations

from pathlib import Path

PRESETS: dict[str, list[str]] = {
    "imagenet-cnn": [
        "timm:resnet50.a1_in1k?pretrained=true",
        "timm:convnext_tiny.fb_in1k?pretrained=true",
        "timm:efficientnet_b0.ra_in1k?pretrained=true",
        "timm:mobilenetv3_large_100.ra_in1k?pretrained=true",
        "timm:regnety_016.tv2_in1k?pretrained=true",
    ],
    "imagenet-vit": [
        "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k?pretrained=true",
        "timm:vit_small_patch16_224.augreg_in21k_ft_in1k?pretrained=true",
        "timm:deit_small_patch16_224.fb_in1k?pretrained=true",
        "timm:swin_tiny_patch4_window7_224.ms_in1k?pretrained=true",
    ],
    "imagenet-mixed": [
        "timm:resnet50.a1_in1k?pretrained=true",
        "timm:convnext_tiny.fb_in1k?pretrained=true",
        "timm:efficientnet_b0.ra_in1k?pretrained=true",
        "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k?pretrained=true",
        "timm:deit_small_patch16_224.fb_in1k?pretrained=true",
        "timm:swin_tiny_patch4_window7_224.ms_in1k?pretrained=true",
    ],
    "clip": [
        "open_clip:ViT-B-32?pretrained=openai",
        "open_clip:ViT-B-16?pretrained=openai",
        "open_clip:RN50?pretrained=openai",
        "open_clip:convnext_base?pretrained=laion400m_s13b_b51k",
    ],
}


def demo_specs() -> list[str]:
    """The shipped ``demo:`` models, read from the package's weight files (no framework)."""
    folder = Path(__file__).parent / "weights"
    return sorted(f"demo:{p.stem.removeprefix('demo-')}" for p in folder.glob("demo-*.safetensors"))


def local_status(spec: str) -> str:
    """Whether a spec's weights can load offline, told without importing torch:
    ``shipped``, ``random init``, ``cached`` / ``not cached`` (timm weights in the local
    Hugging Face cache, under timm's own ``timm/<name>`` repositories), or ``check`` where
    only the framework can tell (open_clip's weight table; ``neaudit zoo list --check``)."""
    scheme, _, rest = spec.partition(":")
    target, _, query = rest.partition("?")
    options = dict(part.partition("=")[::2] for part in query.split("&") if part)
    if scheme == "demo":
        return "shipped"
    if "weights" in options:
        return "local file" if Path(options["weights"]).is_file() else "missing file"
    if options.get("pretrained", "false").lower() in ("false", "0", "no", ""):
        return "random init"
    if scheme == "timm":
        from huggingface_hub import try_to_load_from_cache

        found = (try_to_load_from_cache(f"timm/{target}", name)
                 for name in ("model.safetensors", "pytorch_model.bin"))
        return "cached" if any(isinstance(path, str) for path in found) else "not cached"
    return "check"
