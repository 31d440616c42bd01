"""Named zoos of public pretrained models (``--zoo imagenet-mixed``): specs only, resolved
by :func:`neaudit.zoo.create_model`, whose weights must already be in the local cache."""

from __future__ import annotations

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
